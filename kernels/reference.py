"""PyTorch reference for the batched per-task (multi-)LoRA linear: the specification and the CPU path.

For rows sorted by task (segment t = rows ``seg_offsets[t]:seg_offsets[t+1]``)::

    y = x W^T + b + shared_scale * (x_l A_0^T) B_0^T + task_scale * (x_l A_t^T) B_t^T

where ``x_l`` is the LoRA input (``x`` after LoRA dropout; ``x`` itself when ``lora_x`` is None).

``param_grad_rows`` ([N] bool, optional) routes gradients: the adapters' *parameter* gradients sum only over
the rows where it is True, while the gradient with respect to the inputs still flows through every row's
adapters. CKF uses it so that the text-only loss trains the LoRAs and the hybrid loss trains only the
mapping side (``ckf_method.md`` section 3), in one forward/backward pass over both forms.
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
    param_grad_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Applies the frozen base linear plus the shared and per-task LoRA updates.

    Shapes:
        x, lora_x: [N, d_in], rows sorted by task.
        weight: [d_out, d_in]; bias: [d_out] or None.
        shared_a: [r0, d_in]; shared_b: [d_out, r0] (both None: no shared adapter on this layer).
        task_a: [T, r, d_in]; task_b: [T, d_out, r] (both None: no task adapters on this layer).
        seg_offsets: [T + 1] int64, non-decreasing, seg_offsets[0] == 0, seg_offsets[T] == N.
        param_grad_rows: [N] bool or None (None = every row trains the adapters).
    Returns: [N, d_out] in x's dtype.
    """
    y = F.linear(x, weight, bias)
    lx = x if lora_x is None else lora_x
    if shared_a is not None:
        y = y + shared_scale * _lora(lx, shared_a, shared_b, param_grad_rows)
    if task_a is not None:
        # One GEMM pair per task over its contiguous row segment (T <= 16 iterations, no per-row gather).
        bounds = seg_offsets.tolist()  # the torch path syncs anyway: the exact check below is free
        _check_bounds(bounds, task_a.shape[0], x.shape[0])
        parts = []
        for t in range(task_a.shape[0]):
            lo, hi = bounds[t], bounds[t + 1]
            if hi > lo:
                rows = param_grad_rows[lo:hi] if param_grad_rows is not None else None
                parts.append(_lora(lx[lo:hi], task_a[t], task_b[t], rows))
        if parts:
            y = y + task_scale * torch.cat(parts, dim=0)
    return y


def _check_bounds(bounds, num_tasks: int, n_rows: int) -> None:
    """Raises ValueError unless ``bounds`` (T + 1 ints) start at 0, never decrease and end at ``n_rows``."""
    if len(bounds) != num_tasks + 1:
        raise ValueError(f"seg_offsets has {len(bounds)} entries, expected T + 1 = {num_tasks + 1}")
    if bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])) or bounds[-1] != n_rows:
        raise ValueError(f"seg_offsets {bounds} must start at 0, never decrease and end at the row count "
                         f"{n_rows}: rows not covered by a segment would get no LoRA term")


def check_segment_offsets(seg_offsets: torch.Tensor, n_rows: int) -> None:
    """Validates [T + 1] segment offsets against ``n_rows`` rows: start 0, non-decreasing, end ``n_rows``.

    Offsets in host memory are checked exactly (ValueError). Offsets on a GPU are checked without a host sync:
    ``torch._assert_async`` queues the test on the device, and a violation surfaces as a device-side assert
    error at the next synchronisation (it poisons the CUDA context: a bug, not a recoverable condition). The
    model validates its offsets once per batch (``TaskSegments``) and the layers skip the per-call check.
    """
    if seg_offsets.dim() != 1 or seg_offsets.numel() < 1:
        raise ValueError(f"seg_offsets must be a 1-D [T + 1] tensor, got shape {tuple(seg_offsets.shape)}")
    if seg_offsets.device.type == "cpu":
        _check_bounds(seg_offsets.tolist(), seg_offsets.numel() - 1, n_rows)
        return
    ok = (seg_offsets[0] == 0) & (seg_offsets[-1] == n_rows)
    if seg_offsets.numel() > 1:
        ok = ok & (seg_offsets[1:] >= seg_offsets[:-1]).all()
    torch._assert_async(ok, "seg_offsets must start at 0, never decrease and end at the row count")


def _lora(lx: torch.Tensor, a: torch.Tensor, b: torch.Tensor, param_grad_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """(lx A^T) B^T; lx [n, d_in], a [r, d_in], b [d_out, r] -> [n, d_out]."""
    if param_grad_rows is None:
        return F.linear(F.linear(lx, a), b)
    return _RowGatedLoRA.apply(lx, a, b, param_grad_rows)


class _RowGatedLoRA(torch.autograd.Function):
    """(lx A^T) B^T whose A/B gradients sum only over the rows with ``rows`` True; d lx over every row.

    Same cost as the plain pair of GEMMs: the mask multiplies the rank-sized [n, r] factors, not [n, d]."""

    @staticmethod
    def forward(ctx, lx, a, b, rows):
        h = F.linear(lx, a)  # [n, r]
        ctx.save_for_backward(lx, a, b, h, rows)
        return F.linear(h, b)

    @staticmethod
    def backward(ctx, dy):
        lx, a, b, h, rows = ctx.saved_tensors
        keep = rows.to(dy.dtype).unsqueeze(1)  # [n, 1]
        dh = dy @ b  # [n, r]
        d_lx = dh @ a if ctx.needs_input_grad[0] else None
        d_a = (dh * keep).t() @ lx if ctx.needs_input_grad[1] else None
        d_b = dy.t() @ (h * keep) if ctx.needs_input_grad[2] else None
        return d_lx, d_a, d_b, None


def multi_lora_linear_per_row(x, weight, bias, shared_a, shared_b, task_a, task_b, task_ids,
                              shared_scale, task_scale, lora_x=None, param_grad_rows=None):
    """The same maths one row at a time (task of row i = task_ids[i]); the slow oracle for tests.
    ``param_grad_rows``: rows where it is False use detached adapter weights (no parameter gradient)."""
    lx = x if lora_x is None else lora_x
    rows = []
    for i in range(x.shape[0]):
        yi = F.linear(x[i], weight, bias)
        trains = param_grad_rows is None or bool(param_grad_rows[i])
        sa, sb, ta, tb = ((w if trains or w is None else w.detach()) for w in (shared_a, shared_b, task_a, task_b))
        if shared_a is not None:
            yi = yi + shared_scale * (sb @ (sa @ lx[i]))
        if task_a is not None:
            t = int(task_ids[i])
            yi = yi + task_scale * (tb[t] @ (ta[t] @ lx[i]))
        rows.append(yi)
    return torch.stack(rows)


def segment_offsets(sorted_task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """[N] task ids sorted ascending -> [num_tasks + 1] int64 segment offsets (empty segments allowed)."""
    counts = torch.bincount(sorted_task_ids.long(), minlength=num_tasks)
    offsets = torch.zeros(num_tasks + 1, dtype=torch.long, device=sorted_task_ids.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    return offsets
