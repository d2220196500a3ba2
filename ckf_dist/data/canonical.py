"""Shared preparation steps after a source reader: contiguous ids, the per-user time split, cold flags and
each interaction's history window.

Ids: raw ids are sorted (numerically when every raw id of the table is an integer, e.g. MovieLens' "1".."943";
lexicographically otherwise) and numbered 0..n-1, so the same raw data always gets the same ids. Users are
those with at least one valid interaction; items are the whole catalogue (items nobody interacted with are
kept: they are valid negatives). An item without a (non-empty) title is called "item <raw id>"; the manifest
counts them (``num_items_fallback_title``).

Split rule (per user, by time; ties broken by item id): with ``T = data.test_per_user`` and ``n`` the user's
interactions, ``h = min(2T, n - 1)`` interactions are held out: the last ``ceil(h / 2)`` go to test, the
``floor(h / 2)`` before them to valid, the rest to train. Users with ``n > 2T`` get exactly T test + T valid;
every user keeps at least one train interaction; a short user fills test first, then valid, alternately
(T = 1: n = 1 -> train only; n = 2 -> 1 train + 1 test; T = 2, n = 4 -> 1 train, 1 valid, 2 test).

History of an interaction: the user's interactions with a strictly smaller timestamp (same-second
interactions are not each other's history), the last ``data.history_len`` of them, oldest first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ckf_dist.config import DataConfig
from ckf_dist.data.raw import RawData, clean_text_array
from ckf_dist.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, SPLITS, USERS_SCHEMA

SPLIT_RULE = ("per user by time (ties by item id), T = data.test_per_user, n = the user's interactions: "
              "h = min(2T, n-1) held out, the last ceil(h/2) -> test, the floor(h/2) before -> valid, rest -> train "
              "(n > 2T: T test + T valid; every user keeps >= 1 train interaction)")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}  # train 0, valid 1, test 2


@dataclass
class Canonical:
    """The interaction log with contiguous ids, sorted by (user, timestamp, item); arrays are row-aligned."""

    user: np.ndarray  # int64 [N]
    item: np.ndarray  # int64 [N]
    rating: np.ndarray  # float32 [N], NaN = none
    timestamp: np.ndarray  # int64 [N]
    review: pa.Array  # [N] string, null = no review
    split: np.ndarray  # int8 [N], SPLIT_CODES
    hist_start: np.ndarray  # int64 [N]: rows hist_start..hist_end-1 are this row's history
    hist_end: np.ndarray  # int64 [N]
    user_start: np.ndarray  # int64 [num_users + 1]: the user's rows are user_start[u]..user_start[u+1]-1
    raw_user_ids: list  # [num_users] str
    raw_item_ids: list  # [num_items] str
    titles: list  # [num_items] str
    is_cold_user: np.ndarray  # bool [num_users]
    num_fallback_titles: int = 0  # items whose title was missing or empty and became "item <raw id>"

    @property
    def num_users(self) -> int:
        return len(self.raw_user_ids)

    @property
    def num_items(self) -> int:
        return len(self.raw_item_ids)

    @property
    def num_interactions(self) -> int:
        return int(self.user.size)

    @property
    def user_counts(self) -> np.ndarray:
        return np.diff(self.user_start)

    def users_table(self) -> pa.Table:
        return pa.table({
            "user_id": pa.array(np.arange(self.num_users, dtype=np.int64)),
            "raw_user_id": pa.array(self.raw_user_ids, pa.string()),
            "num_interactions": pa.array(self.user_counts.astype(np.int64)),
            "is_cold": pa.array(self.is_cold_user),
        }, schema=USERS_SCHEMA)

    def items_table(self) -> pa.Table:
        return pa.table({
            "item_id": pa.array(np.arange(self.num_items, dtype=np.int64)),
            "raw_item_id": pa.array(self.raw_item_ids, pa.string()),
            "title": pa.array(self.titles, pa.string()),
        }, schema=ITEMS_SCHEMA)

    def interactions_table(self) -> pa.Table:
        split_names = np.array(SPLITS, dtype=object)[self.split]
        return pa.table({
            "user_id": pa.array(self.user),
            "item_id": pa.array(self.item),
            "rating": pa.array(self.rating, pa.float32(), mask=np.isnan(self.rating)),  # NaN -> null
            "timestamp": pa.array(self.timestamp),
            "split": pa.array(split_names.tolist(), pa.string()),
            "is_cold": pa.array(self.is_cold_user[self.user]),
        }, schema=INTERACTIONS_SCHEMA)

    def split_counts(self) -> dict[str, int]:
        counts = np.bincount(self.split, minlength=len(SPLITS))
        return {name: int(counts[code]) for name, code in SPLIT_CODES.items()}


def sorted_ids(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """Returns (sorted unique raw ids, index of each value in them). Numeric order if all ids are integers."""
    unique = pc.unique(column)
    try:
        order = pc.sort_indices(pc.cast(unique, pa.int64()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # ids that are not integers (ASINs, names)
        order = pc.sort_indices(unique)  # sort as strings instead: same vocabulary, lexicographic order
    vocab = pc.take(unique, order)
    codes = pc.index_in(column, value_set=vocab)
    return vocab, codes


def split_codes(user_start: np.ndarray, user: np.ndarray, test_per_user: int) -> np.ndarray:
    """Vectorised split rule (see the module docstring) for rows sorted by (user, time)."""
    n = np.diff(user_start)[user]
    from_end = user_start[user + 1] - 1 - np.arange(user.size)  # 0 = the user's last interaction
    held_out = np.minimum(2 * test_per_user, np.maximum(n - 1, 0))
    n_test = (held_out + 1) // 2
    n_valid = held_out // 2
    split = np.full(user.size, SPLIT_CODES["train"], dtype=np.int8)
    split[from_end < n_test + n_valid] = SPLIT_CODES["valid"]
    split[from_end < n_test] = SPLIT_CODES["test"]
    return split


def history_windows(user: np.ndarray, timestamp: np.ndarray, user_start: np.ndarray,
                    history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) row ranges of each row's history: same user, strictly earlier timestamp, last ``history_len``."""
    idx = np.arange(user.size)
    new_group = np.ones(user.size, dtype=bool)
    new_group[1:] = (user[1:] != user[:-1]) | (timestamp[1:] != timestamp[:-1])
    hist_end = np.maximum.accumulate(np.where(new_group, idx, 0))  # first row of the (user, timestamp) group
    hist_start = np.maximum(user_start[user], hist_end - history_len)
    return hist_start.astype(np.int64), hist_end.astype(np.int64)


def build_canonical(raw: RawData, cfg: DataConfig) -> Canonical:
    """Assigns ids, sorts, splits and flags; raises ValueError naming the key for an impossible config."""
    if cfg.test_per_user < 0:
        raise ValueError(f"data.test_per_user={cfg.test_per_user} must be >= 0")
    if cfg.history_len < 0:
        raise ValueError(f"data.history_len={cfg.history_len} must be >= 0")
    inter = raw.interactions
    user_vocab, user_codes = sorted_ids(inter.column("raw_user_id"))
    item_vocab, order = sorted_ids(raw.items.column("raw_item_id"))
    item_codes = pc.index_in(inter.column("raw_item_id"), value_set=item_vocab)
    if item_codes.null_count:  # RawData.validate already guarantees this; keep the invariant explicit
        raise ValueError(f"source {raw.source!r}: interactions reference items missing from the item table")
    titles_by_code = pc.take(raw.items.column("title"), pc.sort_indices(order))

    user = user_codes.to_numpy().astype(np.int64)
    item = item_codes.to_numpy().astype(np.int64)
    timestamp = inter.column("timestamp").to_numpy().astype(np.int64)
    rating = inter.column("rating").to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
    perm = np.lexsort((item, timestamp, user))
    user, item, timestamp, rating = user[perm], item[perm], timestamp[perm], rating[perm]
    review = clean_text_array(pc.take(inter.column("review"), pa.array(perm)))

    num_users = len(user_vocab)
    user_start = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=num_users), out=user_start[1:])
    hist_start, hist_end = history_windows(user, timestamp, user_start, cfg.history_len)
    raw_item_ids = item_vocab.to_pylist()
    fallback = pc.binary_join_element_wise("item ", item_vocab, "")  # for a missing or empty title
    cleaned_titles = clean_text_array(titles_by_code)
    titles = pc.coalesce(cleaned_titles, fallback).to_pylist()
    return Canonical(
        user=user, item=item, rating=rating, timestamp=timestamp,
        review=review,
        split=split_codes(user_start, user, cfg.test_per_user),
        hist_start=hist_start, hist_end=hist_end, user_start=user_start,
        raw_user_ids=user_vocab.to_pylist(), raw_item_ids=raw_item_ids, titles=titles,
        is_cold_user=np.diff(user_start) <= cfg.cold_user_max_interactions,
        num_fallback_titles=cleaned_titles.null_count,
    )
