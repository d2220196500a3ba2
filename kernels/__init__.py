"""Batched per-task LoRA kernels, installed as ``ckf_dist.kernels``.

``multi_lora_linear(..., impl="auto")`` dispatches to the fused Triton kernel on CUDA tensors and to the
PyTorch reference elsewhere. Triton is imported lazily so that CPU-only use never needs a GPU driver.
"""
from __future__ import annotations

from .reference import multi_lora_linear_per_row, multi_lora_linear_reference, segment_offsets

IMPLS = ("auto", "torch", "triton")


def multi_lora_linear(x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets,
                      shared_scale: float, task_scale: float, lora_x=None, impl: str = "auto",
                      param_grad_rows=None):
    """See ``multi_lora_linear_reference`` for the maths and shapes; ``impl`` picks the implementation."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda)
    if use_triton:
        from .multi_lora_triton import multi_lora_linear_triton  # noqa: WPS433 (lazy: needs a Triton backend)

        return multi_lora_linear_triton(x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets,
                                        shared_scale, task_scale, lora_x=lora_x, param_grad_rows=param_grad_rows)
    return multi_lora_linear_reference(x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets,
                                       shared_scale, task_scale, lora_x=lora_x, param_grad_rows=param_grad_rows)


__all__ = ["multi_lora_linear", "multi_lora_linear_reference", "multi_lora_linear_per_row", "segment_offsets", "IMPLS"]
