"""Matrix factorisation: score(u, i) = <E_U[u], E_V[i]> (+ biases and the global mean for rating MF)."""
from __future__ import annotations

import torch
from torch import nn


class MF(nn.Module):
    """User table E_U [num_users, dim] and item table E_V [num_items, dim].

    ``use_bias`` (rating MF, ``cf.loss=mse``) adds per-user and per-item biases and a global mean:
    r_hat(u, i) = mu + b_u + b_i + <E_U[u], E_V[i]>. The published tables are E_U and E_V only.
    """

    def __init__(self, num_users: int, num_items: int, dim: int, *, use_bias: bool = False,
                 init_std: float = 0.1, global_mean: float = 0.0):
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.user = nn.Parameter(torch.randn(num_users, dim) * init_std)
        self.item = nn.Parameter(torch.randn(num_items, dim) * init_std)
        self.use_bias = use_bias
        if use_bias:
            self.user_bias = nn.Parameter(torch.zeros(num_users))
            self.item_bias = nn.Parameter(torch.zeros(num_items))
            self.register_buffer("global_mean", torch.tensor(float(global_mean)))

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final tables: (E_U [num_users, dim], E_V [num_items, dim])."""
        return self.user, self.item

    def ego(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Trainable (layer-0) tables, the target of the L2 regulariser."""
        return self.user, self.item

    def score(self, users: torch.Tensor, items: torch.Tensor,
              tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """users, items: [B] int64 (or broadcastable, e.g. [B, 1] and [B, n]) -> scores of the same shape."""
        eu, ev = tables if tables is not None else self.embeddings()
        s = (eu[users] * ev[items]).sum(-1)
        if self.use_bias:
            s = s + self.user_bias[users] + self.item_bias[items] + self.global_mean
        return s

    def score_all(self, users: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """users [B] -> scores over every item [B, num_items]."""
        eu, ev = tables if tables is not None else self.embeddings()
        s = eu[users] @ ev.T
        if self.use_bias:
            s = s + self.user_bias[users, None] + self.item_bias[None, :] + self.global_mean
        return s

    @torch.no_grad()
    def init_rows(self, user_rows: torch.Tensor, user_init: torch.Tensor,
                  item_rows: torch.Tensor, item_init: torch.Tensor) -> None:
        """Warm start: copy user_init [n, dim] into rows user_rows [n] (same for items)."""
        self.user[user_rows] = user_init
        self.item[item_rows] = item_init
