"""Metric functions of the evaluation harness (pure numpy / library code; no model).

CTR: ``auc`` (sklearn, ties count 1/2), ``uauc`` (mean per-user AUC over users with both classes),
``log_loss`` (p clipped to [1e-7, 1 - 1e-7]). Top-K: ``topk_metrics`` (HR@k, NDCG@k with one positive per
row; ties are broken uniformly at random *in expectation*, so a constant scorer gets the chance level, not 0 or
1); ``catalogue_metrics`` the same over the whole catalogue (the item-prediction head; history items excluded). Rating: ``parse_rating`` (the first number of the decoded answer, valid in [1, 5]), ``rating_metrics``
(unparsable answers are counted and scored as the fallback, never dropped). Explanation: ``bleu4``
(sacrebleu corpus BLEU, 0-100) and ``rouge_l`` (rouge-score ROUGE-L F1 averaged over rows, x100).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence

import numpy as np

EPS = 1e-7
UNRANKED = (10**9, 0)  # catalogue_metrics: the rank range of a row that could not be scored (a miss at every k)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def auc(labels: Sequence[float], scores: Sequence[float]) -> Optional[float]:
    """ROC AUC; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0 or len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def uauc(users: Sequence[int], labels: Sequence[float], scores: Sequence[float]) -> tuple[Optional[float], int]:
    """(mean per-user AUC over the users having both classes, number of such users); (None, 0) if none."""
    users = np.asarray(users)
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    values = []
    order = np.argsort(users, kind="stable")
    uniq, starts = np.unique(users[order], return_index=True)
    bounds = list(starts) + [len(order)]
    for i in range(len(uniq)):
        rows = order[bounds[i]:bounds[i + 1]]
        a = auc(y[rows], s[rows])
        if a is not None:
            values.append(a)
    if not values:
        return None, 0
    return float(np.mean(values)), len(values)


def log_loss(labels: Sequence[float], probs: Sequence[float]) -> Optional[float]:
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0:
        return None
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def positive_rank_range(scores: Sequence[float], positive: int) -> tuple[int, int]:
    """(g, e): g candidates score strictly higher than the positive, e others tie with it; the positive's
    0-based rank is uniform over g..g+e under random tie-breaking."""
    s = np.asarray(scores, dtype=np.float64)
    sp = s[positive]
    others = np.delete(s, positive)
    return int((others > sp).sum()), int((others == sp).sum())


def topk_metrics(score_lists: Iterable[Sequence[float]], positives: Iterable[int],
                 ks: Sequence[int] = (1, 5, 10), ndcg_ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """HR@k and NDCG@k (one relevant item: NDCG = 1 / log2(rank + 2) when rank < k), averaged over rows;
    expected values under uniform random tie-breaking. Also ``mrr``. Empty input gives {}."""
    return rank_range_metrics((positive_rank_range(scores, int(pos)) for scores, pos in zip(score_lists, positives)),
                              ks, ndcg_ks)


def catalogue_rank_range(scores: Sequence[float], label: int, exclude: Iterable[int] = ()) -> tuple[int, int]:
    """``positive_rank_range`` of item ``label`` among all items by ``scores`` [I] (the item-prediction head's
    or u.v), with the items in ``exclude`` (the row's history: already interacted with) left out of the ranking
    (the usual full-ranking protocol)."""
    s = np.asarray(scores, dtype=np.float64).copy()
    ex = np.asarray([e for e in exclude if 0 <= e < s.size and e != label], dtype=np.int64)
    s[ex] = -np.inf
    sp = s[label]
    return int((s > sp).sum()), int((s == sp).sum()) - 1


def catalogue_metrics(ranges: Iterable[Optional[tuple[int, int]]], ks: Sequence[int] = (1, 5, 10, 20),
                      ndcg_ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """Full-catalogue HR@k, Recall@k, NDCG@k and MRR from ``catalogue_rank_range`` per row. With one held-out
    item per row (leave-last-out), Recall@k (relevant items found / relevant items) equals HR@k. A row without
    a rank (None: its answer was cut off by ``data.max_seq_len``, so the head had no position to score) counts
    as a miss, not dropped."""
    out = rank_range_metrics((UNRANKED if r is None else tuple(r) for r in ranges), ks, ndcg_ks)
    out.update({f"recall@{k}": out[f"hr@{k}"] for k in ks if f"hr@{k}" in out})
    return out


def rank_range_metrics(ranges: Iterable[tuple[int, int]], ks: Sequence[int] = (1, 5, 10),
                       ndcg_ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """HR@k, NDCG@k and MRR from (g, e) per row (``positive_rank_range``): the positive's 0-based rank is uniform
    over g..g+e; values are expectations under that random tie-breaking. Empty input gives {}."""
    hr = {k: [] for k in ks}
    nd = {k: [] for k in ndcg_ks}
    rr = []
    for g, e in ranges:
        ranks = np.arange(g, g + e + 1)
        for k in ks:
            hr[k].append(float(np.mean(ranks < k)))
        for k in ndcg_ks:
            nd[k].append(float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0))))
        rr.append(float(np.mean(1.0 / (ranks + 1.0))))
    if not rr:
        return {}
    out = {f"hr@{k}": float(np.mean(v)) for k, v in hr.items()}
    out.update({f"ndcg@{k}": float(np.mean(v)) for k, v in nd.items()})
    out["mrr"] = float(np.mean(rr))
    return out


def parse_rating(text: Optional[str], low: float = 1.0, high: float = 5.0) -> Optional[float]:
    """The first number in ``text`` when it lies in [low, high] ("4", " 4.", "4 stars", "3.5"); else None."""
    if text is None:
        return None
    m = _NUMBER.search(text)
    if not m:
        return None
    value = float(m.group(0))
    if not (low <= value <= high) or math.isnan(value):
        return None
    return value


def rating_metrics(labels: Sequence[float], texts: Sequence[Optional[str]], fallback: float,
                   expected: Optional[Sequence[float]] = None) -> dict[str, float]:
    """MAE/RMSE of parsed greedy answers, unparsable ones scored as ``fallback`` (the training mean) and
    counted; plus ``expected_mae``/``expected_rmse`` of the expected rating (softmax over "1".."5")."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0:
        return {}
    parsed = [parse_rating(t) for t in texts]
    bad = sum(p is None for p in parsed)
    pred = np.asarray([fallback if p is None else p for p in parsed], dtype=np.float64)
    out = {"mae": float(np.mean(np.abs(pred - y))), "rmse": float(np.sqrt(np.mean((pred - y) ** 2))),
           "unparsable": float(bad), "unparsable_rate": float(bad / y.size), "fallback_rating": float(fallback)}
    if expected is not None:
        e = np.asarray(expected, dtype=np.float64)
        out["expected_mae"] = float(np.mean(np.abs(e - y)))
        out["expected_rmse"] = float(np.sqrt(np.mean((e - y) ** 2)))
    return out


def regression_metrics(labels: Sequence[float], preds: Sequence[float]) -> dict[str, float]:
    """MAE/RMSE of numeric predictions (the CF-only baseline; nothing to parse there)."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0:
        return {}
    p = np.asarray(preds, dtype=np.float64)
    return {"mae": float(np.mean(np.abs(p - y))), "rmse": float(np.sqrt(np.mean((p - y) ** 2))), "unparsable": 0.0,
            "unparsable_rate": 0.0}


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> Optional[float]:
    """Corpus BLEU-4 (sacrebleu defaults: 13a tokenisation, exp smoothing), 0-100."""
    import sacrebleu

    if not hypotheses:
        return None
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> Optional[float]:
    """Mean ROUGE-L F1 (rouge-score, with stemming), x100."""
    from rouge_score import rouge_scorer

    if not hypotheses:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(100.0 * np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]))
