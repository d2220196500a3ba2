"""LightGCN (He et al., SIGIR 2020): linear propagation over the symmetric-normalised user-item graph,
final embedding = mean of the layer-0..L embeddings."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ckf_dist.cf.mf import MF


class _SymmetricSpMM(torch.autograd.Function):
    """y = A x for a symmetric sparse A; the backward is A^T g = A g, which avoids torch's generic sparse
    backward (it transposes and re-sorts A on every call, about 10x slower on CPU)."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, torch.sparse.mm(ctx.adj, grad)


def normalized_adjacency(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> torch.Tensor:
    """Sparse A_hat = D^-1/2 A D^-1/2 of the bipartite graph, shape [U+I, U+I] (CSR, float32).

    users, items: [E] int64 training interactions (duplicates collapse to one edge). Node u is row u,
    item i is row U + i. Isolated nodes have degree 0 and an all-zero row.
    """
    key = np.unique(users.astype(np.int64) * num_items + items.astype(np.int64))
    u, i = key // num_items, key % num_items
    n = num_users + num_items
    rows = np.concatenate([u, num_users + i])
    cols = np.concatenate([num_users + i, u])
    deg = np.bincount(rows, minlength=n).astype(np.float32)
    dinv = np.zeros(n, dtype=np.float32)
    nz = deg > 0
    dinv[nz] = deg[nz] ** -0.5
    vals = dinv[rows] * dinv[cols]
    with warnings.catch_warnings():  # "sparse CSR support is in beta" and invariant-check notices
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals), (n, n),
                                      check_invariants=False)
        return coo.coalesce().to_sparse_csr()


class LightGCN(MF):
    """Ego tables E0_U [U, d], E0_V [I, d]; E^(k+1) = A_hat E^(k); final = mean_k E^(k), k = 0..L.

    ``embeddings()`` runs the full propagation (L sparse [U+I, U+I] x [U+I, d] products), so a training
    step costs O(L * nnz * d); the published tables are the layer-averaged embeddings.
    """

    def __init__(self, num_users: int, num_items: int, dim: int, adj: torch.Tensor, *, num_layers: int = 3,
                 init_std: float = 0.1):
        super().__init__(num_users, num_items, dim, use_bias=False, init_std=init_std)
        self.num_layers = num_layers
        self.adj = adj  # not a buffer: sparse CSR, rebuilt from the data, never saved in a state dict

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.user, self.item], dim=0)  # [U+I, d]
        acc = x
        for _ in range(self.num_layers):
            x = _SymmetricSpMM.apply(self.adj, x)
            acc = acc + x
        out = acc / (self.num_layers + 1)
        return out[: self.num_users], out[self.num_users:]
