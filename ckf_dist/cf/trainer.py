"""Trains a CF model (MF or LightGCN) on the train split with negative sampling and early stopping on a
held-out split; returns the best tables with their evaluation metrics.

All data lives in memory as torch tensors (the CF tables are small: d = 8 by default); one step takes a
shuffled mini-batch of positive (user, item) pairs, samples ``num_negatives`` items per positive uniformly
among the items the user has no training interaction with (rejection sampling against a sorted key array,
vectorised), and minimises BPR, pointwise BCE, or (rating MF) squared error, plus L2 on the batch's
layer-0 embeddings, plus (``cf.mutual``, ``reps`` given) the mutual-learning pull of the batch's final user and
item vectors toward the LLM side's mapped representations (``ckf_dist.mutual``; targets refitted every epoch).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ckf_dist.cf import metrics as M
from ckf_dist.cf.lightgcn import LightGCN, normalized_adjacency
from ckf_dist.cf.mf import MF
from ckf_dist.cf.reader import Interactions
from ckf_dist.config import CFConfig
from ckf_dist.mutual import mutual_loss, mutual_targets


@dataclass
class TrainResult:
    """user_table [num_users, d] / item_table [num_items, d] float32, indexed by data-set id.
    user_ids / item_ids: int64, the ids whose rows carry learned (or warm-started) values; the other rows
    are untrained initialisation and are left out of the published id maps."""

    user_table: np.ndarray
    item_table: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    metrics: dict
    history: list = field(default_factory=list)
    warm_start: dict = field(default_factory=dict)


class NegativeSampler:
    """Uniform negatives excluding each user's training positives.

    keys: sorted int64 u * num_items + i of the positives. ``sample(users [B], n)`` -> items [B, n];
    after ``max_rounds`` rejection rounds any remaining collision is kept and counted in ``collisions``
    (vanishingly rare unless a user has interacted with most of the catalogue).
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, num_items: int, generator: torch.Generator,
                 max_rounds: int = 8):
        self.num_items = num_items
        self.keys = torch.from_numpy(np.unique(users.astype(np.int64) * num_items + items.astype(np.int64)))
        self.gen = generator
        self.max_rounds = max_rounds
        self.collisions = 0

    def is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        key = users * self.num_items + items
        pos = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        return self.keys[pos] == key

    def sample(self, users: torch.Tensor, n: int) -> torch.Tensor:
        u = users[:, None].expand(-1, n)
        out = torch.randint(0, self.num_items, u.shape, generator=self.gen)
        for _ in range(self.max_rounds):
            bad = self.is_positive(u, out)
            if not bad.any():
                return out
            out[bad] = torch.randint(0, self.num_items, (int(bad.sum()),), generator=self.gen)
        self.collisions += int(self.is_positive(u, out).sum())
        return out


class Evaluator:
    """Fixed evaluation material for one held-out split, built once so epochs are comparable.

    * AUC: each held-out (u, i) against one sampled item the user has in neither train nor the split.
    * Recall@20 / NDCG@20: up to ``max_users`` users with held-out items, ranked over all items with their
      training items masked.
    * RMSE (rating MF): on held-out rows with a rating.
    """

    def __init__(self, data: Interactions, split: str, *, max_users: int, seed: int, with_rmse: bool = False,
                 k: int = 20, chunk: int = 512):
        gen = torch.Generator().manual_seed(seed + 7)
        eu, ei, er = data.select(split)
        self.empty = eu.size == 0
        self.k, self.chunk, self.num_items = k, chunk, data.num_items
        if self.empty:
            return
        tu, ti, _ = data.select("train")
        self.u = torch.from_numpy(eu)
        self.i = torch.from_numpy(ei)
        both = NegativeSampler(np.concatenate([tu, eu]), np.concatenate([ti, ei]), data.num_items, gen)
        self.neg = both.sample(self.u, 1)[:, 0]
        has_r = ~np.isnan(er) & with_rmse
        self.ru, self.ri, self.r = self.u[has_r], self.i[has_r], torch.from_numpy(er[has_r])
        users = np.unique(eu)
        if len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
        self.rank_users = torch.from_numpy(users)
        row_of = np.full(data.num_users, -1, dtype=np.int64)
        row_of[users] = np.arange(len(users))
        m = row_of[eu] >= 0
        self.rel_rows, self.rel_cols = torch.from_numpy(row_of[eu][m]), torch.from_numpy(ei[m])
        m = row_of[tu] >= 0
        self.tr_rows, self.tr_cols = torch.from_numpy(row_of[tu][m]), torch.from_numpy(ti[m])
        self.cold_items = int((~np.isin(ei, ti)).sum())

    @torch.no_grad()
    def __call__(self, model: MF, tables: tuple[torch.Tensor, torch.Tensor]) -> dict:
        if self.empty:
            return {}
        out = {"auc": M.auc(model.score(self.u, self.i, tables).numpy(),
                            model.score(self.u, self.neg, tables).numpy())}
        if len(self.r):
            out["rmse"] = M.rmse(model.score(self.ru, self.ri, tables).numpy(), self.r.numpy())
        recalls, ndcgs = [], []
        for start in range(0, len(self.rank_users), self.chunk):
            stop = min(start + self.chunk, len(self.rank_users))
            scores = model.score_all(self.rank_users[start:stop], tables).clone()  # [b, I]
            m = (self.tr_rows >= start) & (self.tr_rows < stop)
            scores[self.tr_rows[m] - start, self.tr_cols[m]] = -math.inf
            rel = torch.zeros_like(scores, dtype=torch.bool)
            m = (self.rel_rows >= start) & (self.rel_rows < stop)
            rel[self.rel_rows[m] - start, self.rel_cols[m]] = True
            r, n = M.recall_ndcg_at_k(scores, rel, self.k)
            recalls.append(r)
            ndcgs.append(n)
        out[f"recall@{self.k}"] = float(torch.cat(recalls).mean())
        out[f"ndcg@{self.k}"] = float(torch.cat(ndcgs).mean())
        return out


def build_model(cfg: CFConfig, data: Interactions, train_users: np.ndarray, train_items: np.ndarray,
                train_ratings: np.ndarray) -> MF:
    if cfg.model == "mf":
        mean = float(np.nanmean(train_ratings)) if cfg.loss == "mse" else 0.0
        return MF(data.num_users, data.num_items, cfg.dim, use_bias=cfg.loss == "mse", global_mean=mean)
    if cfg.model == "lightgcn":
        adj = normalized_adjacency(train_users, train_items, data.num_users, data.num_items)
        return LightGCN(data.num_users, data.num_items, cfg.dim, adj, num_layers=cfg.lightgcn_layers)
    raise ValueError(f"unknown cf.model {cfg.model!r} (mf | lightgcn)")


def match_raw_ids(previous_raw: np.ndarray, current_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows [m], ids [m]): previous row rows[k] holds the raw id whose data-set id here is ids[k].

    previous_raw: str [n_rows], the raw id of each row of a version; current_raw: str [N], the raw id of each
    data-set id of this data set (both unique). Raw ids absent from either side are left out.
    """
    _, rows, ids = np.intersect1d(np.asarray(previous_raw, dtype=str), np.asarray(current_raw, dtype=str),
                                  assume_unique=True, return_indices=True)
    return rows.astype(np.int64), ids.astype(np.int64)


def version_tables(version, data: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """A published version's tables laid out by this data set's ids ([num_users, d], [num_items, d] float32),
    rows mapped by raw id (as a warm start maps them); ids the version lacks get zero rows (score 0). A version
    or data set without raw ids is taken as laid out by data-set id already."""
    users = np.zeros((data.num_users, version.dim), np.float32)
    items = np.zeros((data.num_items, version.dim), np.float32)
    for out, table, prev_raw, cur_raw, ids in (
            (users, version.user_table, version.user_raw_ids, data.user_raw_ids, version.user_ids),
            (items, version.item_table, version.item_raw_ids, data.item_raw_ids, version.item_ids)):
        if prev_raw is not None and cur_raw is not None:
            rows, dest = match_raw_ids(prev_raw, cur_raw)
        else:
            keep = np.asarray(ids) < len(out)
            rows, dest = np.flatnonzero(keep), np.asarray(ids)[keep]
        out[dest] = table[rows]
    return users, items


def _warm_start(model: MF, cfg: CFConfig, data: Interactions, previous, progress
                ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Copies the previous version's row of every user/item whose **raw id** is in this data set (never by
    data-set index: ids are reassigned when a data set is re-prepared). Returns (what was done, for the
    manifest; the data-set user ids and item ids that received a row)."""
    none = np.zeros(0, np.int64)
    if previous is None:
        return {}, none, none
    info = {"from_version": previous.version}
    if previous.dim != cfg.dim or previous.manifest.get("model_type") != cfg.model:
        info["skipped"] = (f"previous version is {previous.manifest.get('model_type')} d={previous.dim}, "
                           f"this run is {cfg.model} d={cfg.dim}")
    elif previous.user_raw_ids is None or previous.item_raw_ids is None:
        info["skipped"] = ("the previous version has no raw ids (an unbound version): its rows cannot be "
                           "mapped to this data set's users and items")
    elif data.user_raw_ids is None or data.item_raw_ids is None:
        info["skipped"] = "this data set's raw ids are unknown (no id maps in the Interactions)"
    if "skipped" in info:
        progress(f"[cf] warm start from {previous.version} skipped, cold start: {info['skipped']}")
        return info, none, none
    u_rows, u_ids = match_raw_ids(previous.user_raw_ids, data.user_raw_ids)
    i_rows, i_ids = match_raw_ids(previous.item_raw_ids, data.item_raw_ids)
    model.init_rows(torch.from_numpy(u_ids), torch.from_numpy(previous.user_table[u_rows]),
                    torch.from_numpy(i_ids), torch.from_numpy(previous.item_table[i_rows]))
    info.update(users=len(u_ids), items=len(i_ids), users_not_in_data=len(previous.user_raw_ids) - len(u_ids),
                items_not_in_data=len(previous.item_raw_ids) - len(i_ids))
    progress(f"[cf] warm start from {previous.version} by raw id: {info['users']} users, {info['items']} items "
             f"({info['users_not_in_data']} users / {info['items_not_in_data']} items not in this data set)")
    return info, u_ids, i_ids


def train_cf(data: Interactions, cfg: CFConfig, *, previous=None, eval_split: str = "valid",
             progress: Callable[[str], None] = print, reps: Optional[np.ndarray] = None) -> TrainResult:
    """Fits ``cfg.model`` on the train split of ``data``; early-stops on ``eval_split``.

    previous: an ``EmbeddingVersion`` to warm-start from (or None): rows are copied by raw id (the version's
    ``*_raw_ids`` against ``data.*_raw_ids``); a version without raw ids gives a cold start.
    reps: the LLM side's item representations [num_items, hidden] (``mutual.load_item_representations``) or
    None; given, each epoch refits the ridge map on the current item table and adds
    ``cfg.mutual_weight * mutual.mutual_loss`` for the batch's positive pairs.
    Returns the tables of the best evaluation (or of the last epoch when the split is empty).
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tu, ti, tr = data.select("train")
    skipped_no_rating = 0
    if cfg.loss == "mse":
        has = ~np.isnan(tr)
        skipped_no_rating = int((~has).sum())
        if not has.any():
            raise ValueError("cf.loss=mse needs ratings, but every train interaction has a null rating "
                             "(implicit-feedback data set): use cf.loss=bpr or pointwise")
        if skipped_no_rating:
            progress(f"[cf] loss=mse: {skipped_no_rating} train rows without a rating are not used")
        tu, ti, tr = tu[has], ti[has], tr[has]
    model = build_model(cfg, data, tu, ti, tr)
    warm, warm_users, warm_items = (_warm_start(model, cfg, data, previous, progress) if cfg.warm_start
                                    else ({}, np.zeros(0, np.int64), np.zeros(0, np.int64)))
    sampler = NegativeSampler(tu, ti, data.num_items, gen)
    evaluator = Evaluator(data, eval_split, max_users=cfg.eval_max_users, seed=cfg.seed,
                          with_rmse=cfg.loss == "mse")
    metric = cfg.early_stop_metric if cfg.early_stop_metric != "auto" else ("rmse" if cfg.loss == "mse" else "auc")
    lower_better = metric == "rmse"
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    U, I, R = torch.from_numpy(tu), torch.from_numpy(ti), torch.from_numpy(tr)
    n = len(U)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    progress(f"[cf] training {cfg.model} (loss={cfg.loss}, d={cfg.dim}) on {n} train interactions, "
             f"{data.num_users} users x {data.num_items} items, {steps_per_epoch} steps/epoch, "
             f"early stop on {eval_split} {metric} (patience {cfg.patience})")
    best, best_epoch, best_tables, bad_evals = None, 0, None, 0
    history = []
    if reps is not None:
        if reps.shape[0] != data.num_items:
            raise ValueError(f"item representations have {reps.shape[0]} rows, the data set {data.num_items} items")
        reps_t = torch.from_numpy(np.ascontiguousarray(reps, dtype=np.float32))
        fit_items = torch.from_numpy(np.union1d(np.unique(ti), warm_items).astype(np.int64))
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        if reps is not None:  # alternate: refit the map on where the CF space is now, then train toward it
            with torch.no_grad():
                cur_items = model.embeddings()[1].detach()
                t_items, t_users = mutual_targets(reps_t, cur_items, fit_items, U, I, data.num_users,
                                                  cfg.mutual_ridge)
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, total_pull = 0.0, 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            u, i = U[idx], I[idx]
            tables = model.embeddings()
            ego_u, ego_i = model.ego()
            reg = ego_u[u].pow(2).sum() + ego_i[i].pow(2).sum()
            if cfg.loss == "mse":
                loss = F.mse_loss(model.score(u, i, tables), R[idx])
            else:
                j = sampler.sample(u, cfg.num_negatives)  # [B, n_neg]
                pos = model.score(u, i, tables)  # [B]
                neg = model.score(u[:, None], j, tables)  # [B, n_neg]
                if cfg.loss == "bpr":
                    loss = -F.logsigmoid(pos[:, None] - neg).mean()
                else:
                    loss = (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                            + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))
                reg = reg + ego_i[j].pow(2).sum() / cfg.num_negatives
            loss_total = loss + cfg.reg * reg / len(idx)
            if reps is not None:
                pull = mutual_loss(tables[0][u], tables[1][i], t_users[u], t_items[i])
                loss_total = loss_total + cfg.mutual_weight * pull
                total_pull += float(pull.detach()) * len(idx)
            opt.zero_grad(set_to_none=True)
            loss_total.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            # clone: MF's embeddings() are the parameters themselves, which later epochs keep updating in place
            # (a bare detach() shares their storage, and the "best" tables would silently be the last ones)
            tables = tuple(t.detach().clone() for t in model.embeddings())
            ev = evaluator(model, tables)
        row = {"epoch": epoch, "loss": total / n, "seconds": time.perf_counter() - te, **ev}
        if reps is not None:
            row["mutual_loss"] = total_pull / n  # before weighting; mean over the epoch's batches
        history.append(row)
        shown = " ".join(f"{k} {v:.4f}" for k, v in ev.items())
        progress(f"[cf] epoch {epoch}/{cfg.epochs} loss {row['loss']:.4f} {shown} ({row['seconds']:.2f}s)")
        value = ev.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            best_tables, best_epoch = tables, epoch  # nothing to early-stop on: keep the last epoch
            continue
        improved = best is None or (value < best if lower_better else value > best)
        if improved:
            best, best_epoch, best_tables, bad_evals = value, epoch, tables, 0
        else:
            bad_evals += 1
            if bad_evals >= cfg.patience:
                progress(f"[cf] early stop at epoch {epoch}: best {metric} {best:.4f} at epoch {best_epoch}")
                break
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    trained_users = np.unique(tu)
    trained_items = np.unique(ti)
    trained_users = np.union1d(trained_users, warm_users)  # warm-started rows carry values too
    trained_items = np.union1d(trained_items, warm_items)
    out_metrics = {k: v for k, v in best_row.items() if k not in ("epoch", "seconds")}
    out_metrics.update(best_epoch=best_epoch, epochs_run=len(history), early_stop_metric=metric,
                       eval_split=eval_split, train_seconds=time.perf_counter() - t0,
                       train_interactions=n, negative_collisions=sampler.collisions,
                       skipped_no_rating=skipped_no_rating,
                       eval_cold_items=getattr(evaluator, "cold_items", 0))
    return TrainResult(best_tables[0].numpy().astype(np.float32), best_tables[1].numpy().astype(np.float32),
                       trained_users.astype(np.int64), trained_items.astype(np.int64), out_metrics, history, warm)


@torch.no_grad()
def evaluate_tables(user_table: np.ndarray, item_table: np.ndarray, data: Interactions, split: str,
                    *, max_users: int = 100000, seed: int = 0) -> dict:
    """AUC / Recall@20 / NDCG@20 of plain dot-product tables ([U, d], [I, d]) on a split (e.g. test)."""
    model = MF(data.num_users, data.num_items, user_table.shape[1])
    ev = Evaluator(data, split, max_users=max_users, seed=seed)  # no RMSE: tables alone carry no biases
    return ev(model, (torch.from_numpy(user_table), torch.from_numpy(item_table)))
