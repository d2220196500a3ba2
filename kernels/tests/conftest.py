"""Kernel tests: Triton runs in its CPU interpreter when there is no GPU; shared case builder.

``TRITON_INTERPRET`` must be set before anything imports ``ckf_dist.kernels.multi_lora_triton`` (the
``@triton.jit`` decorators read it at import time), hence at the top of this conftest.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    # Autotuning compiles ~6 configs per kernel variant: minutes over the GPU grid. The tests check the
    # heuristic configs; test_autotuned_path_gpu covers the autotuned launcher in a subprocess.
    os.environ.setdefault("CKF_LORA_AUTOTUNE", "0")

import pytest  # noqa: E402

from ckf_dist.kernels import segment_offsets  # noqa: E402
from ckf_dist.testing import assert_close_finite, max_rel_err, within_tol  # noqa: E402


class LoraCase:
    """One multi-task LoRA problem: leaf tensors requiring grad + the task ids / offsets of sorted rows."""

    def __init__(self, counts, d_in, d_out, r, r0, dtype=torch.float32, device="cpu", bias=True, lora_x=False,
                 seed=0, scales=(2.0, 0.5)):
        g = torch.Generator().manual_seed(seed)
        T = len(counts)
        self.task_ids = torch.repeat_interleave(torch.arange(T), torch.tensor(counts, dtype=torch.long)).to(device)
        self.seg = segment_offsets(self.task_ids, T)
        n = int(sum(counts))

        def mk(*shape, scale=1.0, grad=True):
            t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
            return t.requires_grad_(grad)

        self.x = mk(n, d_in)
        self.weight = mk(d_out, d_in, scale=d_in ** -0.5, grad=False)  # frozen base weight
        self.bias = mk(d_out, scale=0.1) if bias else None
        self.shared_a = mk(r0, d_in, scale=d_in ** -0.5) if r0 else None
        self.shared_b = mk(d_out, r0, scale=0.3) if r0 else None
        self.task_a = mk(T, r, d_in, scale=d_in ** -0.5) if r else None
        self.task_b = mk(T, d_out, r, scale=0.3) if r else None
        self.lora_x = mk(n, d_in) if lora_x else None
        self.shared_scale, self.task_scale = scales
        self.dy = mk(n, d_out, grad=False)

    def leaves(self):
        """Tensors that require grad, by name."""
        names = ("x", "bias", "shared_a", "shared_b", "task_a", "task_b", "lora_x")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None and getattr(self, k).requires_grad}

    def args(self, cast=None):
        """Positional args of multi_lora_linear_*; ``cast`` maps each tensor (e.g. to a float64 leaf copy)."""
        c = (lambda t: t) if cast is None else (lambda t: None if t is None else cast(t))
        return (c(self.x), c(self.weight), c(self.bias), c(self.shared_a), c(self.shared_b), c(self.task_a),
                c(self.task_b), self.seg, self.shared_scale, self.task_scale)


def run_fwd_bwd(fn, case: LoraCase, cast=None, **kwargs):
    """Runs fn forward + backward with case.dy; returns (y, {name: grad}) for the (possibly cast) leaves."""
    if cast is None:
        leaves = case.leaves()
        args = case.args()
        lora_x = case.lora_x
    else:
        mapped = {id(t): cast(t).detach().requires_grad_(t.requires_grad) for t in
                  (case.x, case.weight, case.bias, case.shared_a, case.shared_b, case.task_a, case.task_b,
                   case.lora_x) if t is not None}
        remap = lambda t: mapped[id(t)]  # noqa: E731
        args = case.args(remap)
        lora_x = None if case.lora_x is None else remap(case.lora_x)
        leaves = {k: mapped[id(v)] for k, v in case.leaves().items()}
    y = fn(*args, lora_x=lora_x, **kwargs)
    dy = case.dy if cast is None else cast(case.dy)
    grads = torch.autograd.grad(y, list(leaves.values()), dy, allow_unused=True) if leaves and y.numel() else \
        [torch.zeros_like(v) for v in leaves.values()]
    return y, {k: (torch.zeros_like(leaves[k]) if gr is None else gr) for k, gr in zip(leaves, grads)}


def grad_rows_mask(n: int, pattern: str, device="cpu") -> torch.Tensor:
    """[n] bool: "mixed" = a fixed irregular pattern with both values in every case below; "all"/"none"."""
    if pattern == "all":
        return torch.ones(n, dtype=torch.bool, device=device)
    if pattern == "none":
        return torch.zeros(n, dtype=torch.bool, device=device)
    return (torch.arange(n, device=device) * 3 + 1) % 5 < 3


def per_row_oracle(case):
    """multi_lora_linear_per_row with the case's per-row task ids, callable like the reference."""
    from ckf_dist.kernels import multi_lora_linear_per_row

    def per_row(*args, lora_x=None, param_grad_rows=None):
        args = list(args)
        args[7] = case.task_ids
        return multi_lora_linear_per_row(*args, lora_x=lora_x, param_grad_rows=param_grad_rows)
    return per_row


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel test runs with outputs allocated as NaN (``POISON_OUTPUTS``): a tile the kernels leave
    unwritten fails the NaN-aware comparisons instead of passing on whatever memory held."""
    import ckf_dist.kernels.multi_lora_triton as mlt

    monkeypatch.setattr(mlt, "POISON_OUTPUTS", True)


@pytest.fixture
def kt():
    """Test helpers (test modules cannot import conftest under --import-mode=importlib). ``rel_err`` is
    ``ckf_dist.testing.max_rel_err`` (inf on any NaN/inf), ``close`` is ``assert_close_finite``."""
    return SimpleNamespace(Case=LoraCase, run=run_fwd_bwd, rel_err=max_rel_err, within=within_tol,
                           close=assert_close_finite, grad_rows=grad_rows_mask, per_row=per_row_oracle)
