"""Comparisons for tests that treat NaN and inf as failures.

A tolerance check written as ``err > tol`` passes on NaN (every comparison with NaN is False), and a
``max |a - b|`` over a tensor holding NaN is NaN: a kernel that writes NaN into one output row would pass it.
Every comparison of a tensor against a reference in the test suites goes through these two functions:

* ``max_rel_err(actual, expected)``: the normwise relative error max |a - e| / max(max |e|, 1e-6) in float64,
  ``inf`` when either tensor holds a non-finite value or the shapes differ (so ``err <= tol`` is False);
* ``assert_close_finite(actual, expected, rtol, atol, name)``: elementwise |a - e| <= atol + rtol |e| (as
  ``torch.testing.assert_close``), after checking shapes and that both tensors are finite everywhere; the
  message names the tensor, the first offending index and the values there.
"""
from __future__ import annotations

import math

import torch

__all__ = ["max_rel_err", "assert_close_finite", "within_tol"]


def _as_tensor(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.as_tensor(t)


def max_rel_err(actual, expected) -> float:
    """max |actual - expected| / max(max |expected|, 1e-6) in float64; ``inf`` when either holds a NaN or an inf
    or their shapes differ; 0.0 when both are empty."""
    a, e = _as_tensor(actual), _as_tensor(expected)
    if tuple(a.shape) != tuple(e.shape):
        return math.inf
    if a.numel() == 0:
        return 0.0
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(e).all())):
        return math.inf
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-6)).item()


def within_tol(err: float, tol: float) -> bool:
    """``err <= tol`` for a finite ``err``; False for NaN and inf (never write ``err > tol`` to mean a failure)."""
    return math.isfinite(err) and err <= tol


def assert_close_finite(actual, expected, rtol: float, atol: float, name: str = "tensor") -> None:
    """Raises AssertionError unless the shapes match, both tensors are finite everywhere and
    |actual - expected| <= atol + rtol * |expected| elementwise (compared in float64)."""
    a, e = _as_tensor(actual), _as_tensor(expected)
    if tuple(a.shape) != tuple(e.shape):
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
    for what, t in (("actual", a64), ("expected", e64)):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise AssertionError(f"{name}: {int(bad.sum())} non-finite value(s) in the {what} tensor, first at "
                                 f"index {idx}: {t[idx].item()}")
    if a64.numel() == 0:
        return
    diff = (a64 - e64).abs()
    over = diff > atol + rtol * e64.abs()
    if bool(over.any()):
        idx = tuple(int(i) for i in over.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(over.sum())} of {a64.numel()} elements differ beyond atol={atol:g} + rtol={rtol:g}*|expected|;"
            f" max abs err {diff.max().item():.3g}, max rel err {max_rel_err(a64, e64):.3g}; first at index {idx}: "
            f"{a64[idx].item()!r} vs expected {e64[idx].item()!r}")
