"""Evaluation metrics for the CF models.

* AUC: ``sklearn.metrics.roc_auc_score`` on (held-out positive, sampled negative) pairs.
* Recall@K / NDCG@K: full ranking over all items with the user's training items masked out, computed
  vectorised in torch (``topk`` over a [users, items] score block, then a gather against a boolean
  relevance matrix); no per-user Python loop.
* RMSE: for rating MF.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


def auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Area under the ROC curve of positives [P] against negatives [N] (sklearn)."""
    pos_scores = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg_scores = np.asarray(neg_scores, dtype=np.float64).ravel()
    if pos_scores.size == 0 or neg_scores.size == 0:
        return float("nan")
    labels = np.concatenate([np.ones_like(pos_scores), np.zeros_like(neg_scores)])
    return float(roc_auc_score(labels, np.concatenate([pos_scores, neg_scores])))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.size == 0:
        return float("nan")
    return float(math.sqrt(np.mean((pred - target) ** 2)))


def recall_ndcg_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user Recall@k and NDCG@k.

    scores:   [B, I] float, already masked (-inf) where an item must not be ranked (training items).
    relevant: [B, I] bool, the held-out items of each user (each row must have at least one).
    Returns (recall [B], ndcg [B]). Recall@k = hits in top-k / |relevant|; NDCG@k uses binary gains and
    the ideal DCG of min(|relevant|, k) hits.
    """
    k = min(k, scores.shape[1])
    top = torch.topk(scores, k, dim=1).indices  # [B, k]
    hits = torch.gather(relevant, 1, top).float()  # [B, k]
    n_rel = relevant.sum(dim=1).float().clamp(min=1)  # [B]
    recall = hits.sum(dim=1) / n_rel
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float32))  # [k]
    dcg = (hits * discount).sum(dim=1)
    ideal_cum = torch.cumsum(discount, dim=0)  # ideal DCG for 1..k relevant items
    idcg = ideal_cum[(n_rel.clamp(max=k) - 1).long()]
    return recall, dcg / idcg
