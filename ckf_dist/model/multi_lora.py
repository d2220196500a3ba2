"""Multi-LoRA linear layers: a frozen base weight, one task-shared adapter and T stacked per-task adapters.

For a row of task t: ``y = W x + b + s_shared * B_0 A_0 x_l + s_task * B_t A_t x_l`` with ``x_l`` the input
after LoRA dropout. Rows arrive sorted by task; the per-batch segment offsets live in one ``TaskSegments``
object shared by every layer (set once per batch by the model, vLLM-style), so no layer recomputes them.

The layer owns its parameters directly (``weight``, ``bias``, ``shared_a``...) rather than wrapping the
original ``nn.Linear`` as a child: DeepSpeed ZeRO-3 gathers a module's *own* parameters in its pre-forward
hook, so everything the layer's forward reads is gathered by that one hook.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ckf_dist.kernels import check_segment_offsets, multi_lora_linear

FIRST_TASK_SLOTS = 5  # ctr, topk, rating, explanation, review_rating: initialised from the global RNG stream


@dataclass
class TaskSegments:
    """Per-batch routing shared by all Multi-LoRA layers.

    row_offsets: [T + 1] int64, rows of the batch (samples) sorted by task; segment t = rows
        row_offsets[t]:row_offsets[t+1]. Token offsets for a [B, L, d] activation are row_offsets * L.
    """

    row_offsets: Optional[torch.Tensor] = None
    # [B] bool or None: rows whose loss may train the adapters' parameters (gradient routing; None = all rows).
    param_grad_rows: Optional[torch.Tensor] = None
    # [B, L] bool or None: the same per token, for packed rows that hold samples of both prompt forms.
    param_grad_tokens: Optional[torch.Tensor] = None
    _token_offsets: dict = field(default_factory=dict)
    _token_grad_rows: dict = field(default_factory=dict)
    _tile_lists: dict = field(default_factory=dict)

    def set(self, row_offsets: torch.Tensor, param_grad_rows: Optional[torch.Tensor] = None,
            param_grad_tokens: Optional[torch.Tensor] = None) -> None:
        self.row_offsets = row_offsets
        self.param_grad_rows = param_grad_rows
        self.param_grad_tokens = param_grad_tokens
        self._token_offsets = {}
        self._token_grad_rows = {}
        self._tile_lists = {}

    def token_grad_rows(self, seq_len: int) -> Optional[torch.Tensor]:
        """[B * L] bool over the flattened tokens (cached per sequence length), or None."""
        if self.param_grad_tokens is not None:
            if self.param_grad_tokens.shape[1] != seq_len:
                raise RuntimeError(f"per-token gradient routing set for length {self.param_grad_tokens.shape[1]}, "
                                   f"layer called with {seq_len}")
            return self.param_grad_tokens.reshape(-1)
        if self.param_grad_rows is None:
            return None
        if seq_len not in self._token_grad_rows:
            self._token_grad_rows[seq_len] = self.param_grad_rows.repeat_interleave(seq_len)
        return self._token_grad_rows[seq_len]

    def tile_list(self, seq_len: int, n_tokens: int) -> torch.Tensor:
        """The Triton GEMM's row-tile list over the flattened tokens (``build_tile_list``), built once per batch
        and sequence length and shared by every layer (no per-program scan of the offsets, no host sync)."""
        if seq_len not in self._tile_lists:
            from ckf_dist.kernels.multi_lora_triton import build_tile_list  # lazy: Triton only where it runs

            self._tile_lists[seq_len] = build_tile_list(self.token_offsets(seq_len, n_tokens), n_tokens)
        return self._tile_lists[seq_len]

    def token_offsets(self, seq_len: int, n_tokens: Optional[int] = None) -> torch.Tensor:
        """[T + 1] offsets over the flattened [B * L] tokens (cached per sequence length).

        ``n_tokens`` (B * L of the calling layer): the offsets are validated against it once, when first built
        for this length (``check_segment_offsets``: exact for host offsets, an async device assert for GPU
        ones, no host sync), so the layers skip the per-call check of the kernels."""
        if self.row_offsets is None:
            raise RuntimeError("Multi-LoRA layer called before the batch's task segments were set")
        if seq_len not in self._token_offsets:
            offsets = self.row_offsets * seq_len
            if n_tokens is not None:
                check_segment_offsets(offsets, n_tokens)
            self._token_offsets[seq_len] = offsets
        return self._token_offsets[seq_len]


class MultiLoRALinear(nn.Module):
    """A frozen linear with a shared LoRA and/or stacked per-task LoRAs.

    Parameters (trainable): shared_a [r, d_in], shared_b [d_out, r]; task_a [T, r, d_in], task_b [T, d_out, r].
    B matrices start at zero so the wrapped model is unchanged at step 0 (standard LoRA init).
    """

    def __init__(self, base: nn.Linear, segments: TaskSegments, num_tasks: int, rank: int, alpha: float,
                 dropout: float, shared: bool, per_task: bool, impl: str = "auto", layer_index: int = 0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen, shared storage with the original layer
        self.bias = base.bias
        self.segments = segments
        self.num_tasks = num_tasks
        self.scale = alpha / rank
        self.impl = impl
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        dev, dt = base.weight.device, base.weight.dtype
        self.shared_a = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt)) if shared else None
        self.shared_b = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt)) if shared else None
        self.task_a = nn.Parameter(torch.empty(num_tasks, rank, self.in_features, device=dev, dtype=dt)) if per_task else None
        self.task_b = nn.Parameter(torch.zeros(num_tasks, self.out_features, rank, device=dev, dtype=dt)) if per_task else None
        # Kaiming-uniform like nn.Linear / peft's default for A.
        bound = 1.0 / math.sqrt(self.in_features)
        if self.shared_a is not None:
            nn.init.uniform_(self.shared_a, -bound, bound)
        if self.task_a is not None:
            # The first FIRST_TASK_SLOTS task slots draw from the global stream as they always have (runs keep
            # their initial weights); a slot added later (the next_item task) draws from its own generator seeded
            # by (seed, layer, slot), so adding a task changes no other slot's or layer's initial values.
            nn.init.uniform_(self.task_a[:FIRST_TASK_SLOTS], -bound, bound)
            for t in range(FIRST_TASK_SLOTS, num_tasks):
                g = torch.Generator().manual_seed(torch.initial_seed() * 1_000_003 + layer_index * 101 + t)
                with torch.no_grad():
                    self.task_a[t].copy_(torch.empty_like(self.task_a[t], device="cpu").uniform_(-bound, bound,
                                                                                                 generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d_in] (rows sorted by task) -> [B, L, d_out]."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        seq_len = x.shape[1] if x.dim() == 3 else 1
        offsets = self.segments.token_offsets(seq_len, n_tokens=flat.shape[0])
        # LoRA dropout is passed as a probability: the Triton paths fuse it (Philox mask, no dropped copy of x),
        # the torch path applies F.dropout (the same RNG stream as nn.Dropout).
        p = self.dropout.p if (self.dropout is not None and self.training) else 0.0
        grad_rows = self.segments.token_grad_rows(seq_len) if torch.is_grad_enabled() else None
        # The Triton paths (CUDA) read their row tiles from a list built once per batch; the torch path ignores it.
        tiles = self.segments.tile_list(seq_len, flat.shape[0]) if (flat.is_cuda and self.task_a is not None) else None
        y = multi_lora_linear(flat, self.weight, self.bias, self.shared_a, self.shared_b, self.task_a, self.task_b,
                              offsets, self.scale, self.scale, lora_dropout=p, impl=self.impl,
                              param_grad_rows=grad_rows, check_segments=False, tiles=tiles)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, shared={self.shared_a is not None}, "
                f"tasks={self.num_tasks if self.task_a is not None else 0}, scale={self.scale:g}, impl={self.impl}")


def inject_multi_lora(model: nn.Module, segments: TaskSegments, num_tasks: int, rank: int, alpha: float,
                      dropout: float, shared_targets: list[str], task_targets: list[str], impl: str) -> list[str]:
    """Replaces every ``nn.Linear`` whose attribute name is in the targets by a ``MultiLoRALinear``.

    Returns the qualified names of the replaced layers; raises ValueError when a target matches nothing
    (a typo in ``lora.shared_targets`` would otherwise train nothing, silently).
    """
    targets = set(shared_targets) | set(task_targets)
    replaced, seen = [], set()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                layer = MultiLoRALinear(child, segments, num_tasks, rank, alpha, dropout,
                                        shared=child_name in shared_targets, per_task=child_name in task_targets,
                                        impl=impl, layer_index=len(replaced))
                setattr(parent, child_name, layer)
                replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
                seen.add(child_name)
    missing = targets - seen
    if missing:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {sorted(missing)} match no nn.Linear in the model; its linear layers are "
                         f"named {linear_names}")
    return replaced
