"""Batched per-task LoRA kernels, installed as ``ckf_dist.kernels``.

``multi_lora_linear(..., impl="auto")`` picks the implementation per call with ``dispatch.choose_impl``: the
PyTorch reference off CUDA, for fp32 and mixed dtypes; cuBLAS + the Triton LoRA side kernels on CUDA; the fused
Triton path only where the measured win table says it wins. Triton is imported lazily so that CPU-only use never
needs a GPU driver.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .dispatch import SIDE, TORCH, TRITON, choose_impl, table_fuse_shrink
from .reference import check_segment_offsets, multi_lora_linear_per_row, multi_lora_linear_reference, segment_offsets

IMPLS = ("auto", "torch", "triton", "side")


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _problem(x, weight, shared_a, task_a) -> tuple:
    """The host values ``choose_impl`` and the win table are keyed on (no device read)."""
    r0 = shared_a.shape[0] if shared_a is not None else 0
    r1 = task_a.shape[1] if task_a is not None else 0
    num_tasks = task_a.shape[0] if task_a is not None else 0
    name = _device_name(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else ""
    return name, x.dtype, x.numel() // x.shape[-1], x.shape[-1], weight.shape[0], r0, r1, num_tasks


def resolve_impl(impl: str, x, weight, shared_a, task_a) -> str:
    """``impl`` with "auto" resolved for this call (see ``dispatch.choose_impl``)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    name, dtype, n_rows, d_in, d_out, r0, r1, num_tasks = _problem(x, weight, shared_a, task_a)
    return choose_impl(x.device.type, dtype, weight.dtype, n_rows, d_in, d_out, r0, r1, num_tasks,
                       device_name=name)[0]


def multi_lora_linear(x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets,
                      shared_scale: float, task_scale: float, lora_x=None, impl: str = "auto",
                      param_grad_rows=None, lora_dropout: float = 0.0, check_segments: bool = True, tiles=None):
    """See ``multi_lora_linear_reference`` for the maths and shapes; ``impl`` picks the implementation.

    ``lora_dropout``: LoRA dropout probability (training). The Triton paths fuse it into their kernels (Philox
    mask, no dropped copy of x); the torch path applies ``F.dropout`` to x for the LoRA input. Exclusive with
    ``lora_x``. ``check_segments``: validate seg_offsets against the row count on every call (exact on the torch
    path and for host offsets; an async device assert, no host sync, for CUDA offsets). Callers that validated
    the offsets once per batch (``TaskSegments``) pass False. ``tiles``: the batch's GEMM tile list
    (``multi_lora_triton.build_tile_list``; Triton paths only, ignored by the torch path).
    """
    auto = impl == "auto"
    impl = resolve_impl(impl, x, weight, shared_a, task_a)
    if impl in (TRITON, SIDE):
        from .multi_lora_triton import multi_lora_linear_triton  # noqa: WPS433 (lazy: needs a Triton backend)

        fuse_shrink = None
        if auto and impl == TRITON:  # where the shrink goes, as measured for this shape (else the width rule)
            from .win_table import WIN_TABLE

            fuse_shrink = table_fuse_shrink(WIN_TABLE, *_problem(x, weight, shared_a, task_a))
        return multi_lora_linear_triton(x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets,
                                        shared_scale, task_scale, lora_x=lora_x, param_grad_rows=param_grad_rows,
                                        lora_dropout=lora_dropout, base="triton" if impl == TRITON else "cublas",
                                        check_segments=check_segments, tiles=tiles, fuse_shrink=fuse_shrink)
    assert impl == TORCH
    if lora_dropout > 0:
        if lora_x is not None:
            raise ValueError("pass either lora_x (dropout done outside) or lora_dropout (fused), not both")
        lora_x = F.dropout(x, lora_dropout, training=True)
    return multi_lora_linear_reference(x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets,
                                       shared_scale, task_scale, lora_x=lora_x, param_grad_rows=param_grad_rows)


__all__ = ["multi_lora_linear", "multi_lora_linear_reference", "multi_lora_linear_per_row", "segment_offsets",
           "check_segment_offsets", "choose_impl", "resolve_impl", "IMPLS"]
