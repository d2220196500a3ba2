"""Interaction shards for tests and benchmarks, written in the prepared layout
(``<root>/interactions/part-00000.parquet``, INTERACTIONS_SCHEMA) so the reader is the same as in production.

* ``write_planted``: users and items in latent clusters; a user picks items of its own cluster with
  probability ``p_in`` (so a CF model can beat random by a wide margin).
* ``write_movielens_100k``: the official ``u.data`` (ids shifted to 0-based), split per user by time.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.config import S3Config
from ckf_dist.data import io
from ckf_dist.data.schema import INTERACTIONS_SCHEMA


def _split_by_time(users: np.ndarray, ts: np.ndarray, n_valid: int, n_test: int) -> np.ndarray:
    """Per user, the last ``n_test`` interactions in time -> test, the ``n_valid`` before -> valid."""
    order = np.lexsort((ts, users))  # by user, then time
    u_sorted = users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u_sorted)) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    pos_from_end = np.repeat(counts, counts) - (np.arange(len(users)) - np.repeat(starts, counts)) - 1
    split_sorted = np.where(pos_from_end < n_test, "test",
                            np.where(pos_from_end < n_test + n_valid, "valid", "train"))
    out = np.empty(len(users), dtype=object)
    out[order] = split_sorted
    return out


def interactions_table(users, items, ratings, ts, split, cold_max: int = 5) -> pa.Table:
    counts = np.bincount(users)
    return pa.Table.from_pydict({
        "user_id": users.astype(np.int64), "item_id": items.astype(np.int64),
        "rating": pa.array(ratings, type=pa.float32()) if ratings is not None else pa.nulls(len(users), pa.float32()),
        "timestamp": ts.astype(np.int64), "split": pa.array(split, type=pa.string()),
        "is_cold": counts[users] <= cold_max,
    }, schema=INTERACTIONS_SCHEMA)


def write_table(root: str, table: pa.Table, s3: Optional[S3Config] = None, rows_per_file: int = 0) -> None:
    fs, path = io.get_filesystem(root, s3)
    fs.create_dir(io.join(path, "interactions"), recursive=True)
    step = rows_per_file or table.num_rows
    for k, start in enumerate(range(0, table.num_rows, step)):
        pq.write_table(table.slice(start, step), io.join(path, "interactions", f"part-{k:05d}.parquet"), filesystem=fs)


def planted_table(num_users: int = 300, num_items: int = 200, per_user: int = 24, num_clusters: int = 4,
                  p_in: float = 0.9, seed: int = 0, n_valid: int = 1, n_test: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    ucl = rng.integers(0, num_clusters, num_users)
    icl = np.arange(num_items) % num_clusters
    by_cluster = [np.flatnonzero(icl == c) for c in range(num_clusters)]
    users = np.repeat(np.arange(num_users), per_user)
    inside = rng.random(len(users)) < p_in
    items = rng.integers(0, num_items, len(users))
    for c in range(num_clusters):
        m = inside & (ucl[users] == c)
        items[m] = by_cluster[c][rng.integers(0, len(by_cluster[c]), int(m.sum()))]
    key = np.unique(users * num_items + items)  # one interaction per (user, item)
    users, items = key // num_items, key % num_items
    ts = 1_700_000_000 + rng.permutation(len(users)).astype(np.int64)
    ratings = np.where(icl[items] == ucl[users], 4.0 + rng.random(len(users)), 1.0 + 2 * rng.random(len(users)))
    split = _split_by_time(users, ts, n_valid, n_test)
    return interactions_table(users, items, np.round(ratings).astype(np.float32), ts, split)


def write_planted(root: str, s3: Optional[S3Config] = None, rows_per_file: int = 0, **kw) -> pa.Table:
    table = planted_table(**kw)
    write_table(root, table, s3, rows_per_file)
    return table


def write_movielens_100k(root: str, raw_dir: str, n_valid: int = 5, n_test: int = 5) -> pa.Table:
    """u.data -> 0-based ids, per-user time split (last n_test -> test, n_valid before -> valid)."""
    raw = np.loadtxt(os.path.join(raw_dir, "u.data"), dtype=np.int64)
    users, items, ratings, ts = raw[:, 0] - 1, raw[:, 1] - 1, raw[:, 2].astype(np.float32), raw[:, 3]
    split = _split_by_time(users, ts, n_valid, n_test)
    table = interactions_table(users, items, ratings, ts, split)
    write_table(root, table)
    return table
