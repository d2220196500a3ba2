"""PyTorch reference for the batched per-task (multi-)LoRA linear: the specification and the CPU path.

For rows sorted by task (segment t = rows ``seg_offsets[t]:seg_offsets[t+1]``)::

    y = x W^T + b + shared_scale * (x_l A_0^T) B_0^T + task_scale * (x_l A_t^T) B_t^T

where ``x_l`` is the LoRA input (``x`` after LoRA dropout; ``x`` itself when ``lora_x`` is None).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def multi_lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    shared_a: Optional[torch.Tensor],
    shared_b: Optional[torch.Tensor],
    task_a: Optional[torch.Tensor],
    task_b: Optional[torch.Tensor],
    seg_offsets: torch.Tensor,
    shared_scale: float,
    task_scale: float,
    lora_x: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Applies the frozen base linear plus the shared and per-task LoRA updates.

    Shapes:
        x, lora_x: [N, d_in], rows sorted by task.
        weight: [d_out, d_in]; bias: [d_out] or None.
        shared_a: [r0, d_in]; shared_b: [d_out, r0] (both None: no shared adapter on this layer).
        task_a: [T, r, d_in]; task_b: [T, d_out, r] (both None: no task adapters on this layer).
        seg_offsets: [T + 1] int64, non-decreasing, seg_offsets[0] == 0, seg_offsets[T] == N.
    Returns: [N, d_out] in x's dtype.
    """
    y = F.linear(x, weight, bias)
    lx = x if lora_x is None else lora_x
    if shared_a is not None:
        y = y + shared_scale * F.linear(F.linear(lx, shared_a), shared_b)
    if task_a is not None:
        # One GEMM pair per task over its contiguous row segment (T <= 16 iterations, no per-row gather).
        bounds = seg_offsets.tolist()
        parts = []
        for t in range(task_a.shape[0]):
            lo, hi = bounds[t], bounds[t + 1]
            if hi > lo:
                parts.append(F.linear(F.linear(lx[lo:hi], task_a[t]), task_b[t]))
        if parts:
            y = y + task_scale * torch.cat(parts, dim=0)
    return y


def multi_lora_linear_per_row(x, weight, bias, shared_a, shared_b, task_a, task_b, task_ids,
                              shared_scale, task_scale, lora_x=None):
    """The same maths one row at a time (task of row i = task_ids[i]); the slow oracle for tests."""
    lx = x if lora_x is None else lora_x
    rows = []
    for i in range(x.shape[0]):
        yi = F.linear(x[i], weight, bias)
        if shared_a is not None:
            yi = yi + shared_scale * (shared_b @ (shared_a @ lx[i]))
        if task_a is not None:
            t = int(task_ids[i])
            yi = yi + task_scale * (task_b[t] @ (task_a[t] @ lx[i]))
        rows.append(yi)
    return torch.stack(rows)


def segment_offsets(sorted_task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """[N] task ids sorted ascending -> [num_tasks + 1] int64 segment offsets (empty segments allowed)."""
    counts = torch.bincount(sorted_task_ids.long(), minlength=num_tasks)
    offsets = torch.zeros(num_tasks + 1, dtype=torch.long, device=sorted_task_ids.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    return offsets
