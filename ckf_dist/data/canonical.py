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

Benchmark protocols (optional per-row columns of a source, ``ckf_dist.data.raw.PROTOCOL_FIELDS``): a given
``split`` replaces the rule for its row; a given ``history`` replaces the log history (still cut to its last
``data.history_len`` items); given ``candidates`` and ``cold`` flags are kept per row for the prompts; with a
``label`` column (``data.ctr_labels=given``) the label-0 rows become :class:`GivenNegatives` (CTR rows, never
part of the interaction log, their history taken from the log like any row's) and users who have only label-0 rows
still get an id.
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


def range_lists(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.ListArray:
    """ListArray of int64 whose row r is values[starts[r]:ends[r]] (vectorised gather)."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[flat].astype(np.int64)))


def _last_n(lists: pa.ListArray, n: int) -> pa.ListArray:
    """Each list cut to its last ``n`` values."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.values.to_numpy(zero_copy_only=False)
    return range_lists(values, np.maximum(offsets[:-1], offsets[1:] - n), offsets[1:]) if lengths.size else lists


@dataclass
class GivenNegatives:
    """Label-0 CTR rows of a ``data.ctr_labels=given`` protocol (not interactions); arrays are row-aligned [M]."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    timestamp: np.ndarray  # int64
    split: np.ndarray  # int8, SPLIT_CODES
    history: pa.ListArray  # int64 item ids, oldest first (given, or the user's interactions strictly before)
    is_cold: np.ndarray  # bool: the given flag, else the user's rule

    @property
    def size(self) -> int:
        return int(self.user.size)


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
    # benchmark protocol (None = not given; see the module docstring)
    history_override: pa.ListArray | None = None  # [N] int64 item ids per row, replaces hist_start/hist_end
    candidates: pa.ListArray | None = None  # [N] int64 item ids per row incl. the row's item; null = sample
    cold_override: np.ndarray | None = None  # [N] bool per row, where given (see row_is_cold)
    negatives: GivenNegatives | None = None  # label-0 CTR rows (data.ctr_labels=given)

    def history_lists(self) -> pa.ListArray:
        """[N] each row's history as int64 item ids, oldest first (the given one where the source has it)."""
        if self.history_override is not None:
            return self.history_override
        return range_lists(self.item, self.hist_start, self.hist_end)

    def row_is_cold(self, rows: np.ndarray) -> np.ndarray:
        """The warm/cold flag of interaction rows: the given per-row flag, else the user's rule."""
        return self.cold_override[rows] if self.cold_override is not None else self.is_cold_user[self.user[rows]]

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
    label = raw.protocol("label")
    user_vocab, _ = sorted_ids(inter.column("raw_user_id"))  # users of label-0-only rows get an id too
    item_vocab, order = sorted_ids(raw.items.column("raw_item_id"))
    if label is not None:
        positive = pc.equal(label, 1)
        negative_rows, inter = inter.filter(pc.invert(positive)), inter.filter(positive)
    user_codes = pc.index_in(inter.column("raw_user_id"), value_set=user_vocab)
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
    is_cold_user = np.diff(user_start) <= cfg.cold_user_max_interactions
    proto = _Protocol(inter, perm, item_vocab, cfg.history_len)
    split = proto.split(split_codes(user_start, user, cfg.test_per_user))
    negatives = None
    if label is not None:
        negatives = _given_negatives(negative_rows, user_vocab, item_vocab, user, item, timestamp, user_start,
                                     is_cold_user, cfg.history_len)
    return Canonical(
        user=user, item=item, rating=rating, timestamp=timestamp,
        review=review,
        split=split,
        hist_start=hist_start, hist_end=hist_end, user_start=user_start,
        raw_user_ids=user_vocab.to_pylist(), raw_item_ids=raw_item_ids, titles=titles,
        is_cold_user=is_cold_user,
        num_fallback_titles=cleaned_titles.null_count,
        history_override=proto.history(), candidates=proto.candidates(),
        cold_override=proto.cold(is_cold_user[user]), negatives=negatives,
    )


class _Protocol:
    """The optional protocol columns of the (positive) interactions, in the canonical row order ``perm``."""

    def __init__(self, inter: pa.Table, perm: np.ndarray, item_vocab: pa.Array, history_len: int):
        self.cols = {n: inter.column(n).combine_chunks().take(pa.array(perm)) for n in
                     ("split", "history", "candidates", "cold") if n in inter.column_names}
        self.item_vocab, self.history_len = item_vocab, history_len

    def _item_lists(self, name: str) -> pa.ListArray | None:
        lists = self.cols.get(name)
        if lists is None:
            return None
        codes = pc.index_in(lists.values, value_set=self.item_vocab)  # readers guarantee known ids
        return pa.ListArray.from_arrays(lists.offsets, pc.cast(codes, pa.int64()), mask=lists.is_null())

    def split(self, rule: np.ndarray) -> np.ndarray:
        return _given_split(self.cols.get("split"), rule)

    def history(self) -> pa.ListArray | None:
        lists = self._item_lists("history")
        return None if lists is None else _last_n(lists, self.history_len)

    def candidates(self) -> pa.ListArray | None:
        return self._item_lists("candidates")

    def cold(self, rule: np.ndarray) -> np.ndarray | None:
        given = self.cols.get("cold")
        return None if given is None else _given_flags(given, rule)


def _given_split(given: pa.Array | None, rule: np.ndarray) -> np.ndarray:
    """SPLIT_CODES of the given split names, the rule's code where none is given."""
    if given is None:
        return rule
    codes = pc.index_in(given, value_set=pa.array(SPLITS)).to_numpy(zero_copy_only=False)
    has = pc.is_valid(given).to_numpy(zero_copy_only=False)
    out = rule.copy()
    out[has] = codes[has].astype(np.int8)
    return out


def _given_flags(given: pa.Array, rule: np.ndarray) -> np.ndarray:
    has = pc.is_valid(given).to_numpy(zero_copy_only=False)
    out = rule.copy()
    out[has] = pc.fill_null(given, False).to_numpy(zero_copy_only=False)[has]
    return out


def _given_negatives(rows: pa.Table, user_vocab: pa.Array, item_vocab: pa.Array, pos_user: np.ndarray,
                     pos_item: np.ndarray, pos_time: np.ndarray, user_start: np.ndarray, is_cold_user: np.ndarray,
                     history_len: int) -> GivenNegatives:
    """The label-0 rows: ids, given split, history (given, else the user's interactions strictly before, last
    ``history_len``), cold flag (given, else the user's rule)."""
    user = pc.index_in(rows.column("raw_user_id"), value_set=user_vocab).to_numpy().astype(np.int64)
    item = pc.index_in(rows.column("raw_item_id"), value_set=item_vocab).to_numpy().astype(np.int64)
    timestamp = rows.column("timestamp").to_numpy().astype(np.int64)
    if "history" in rows.column_names:
        history = _Protocol(rows, np.arange(rows.num_rows), item_vocab, history_len).history()
    else:
        # interactions of u strictly before t: rank times densely so (user, rank) fits one sortable int64 key
        times, inverse = np.unique(np.concatenate([pos_time, timestamp]), return_inverse=True)
        key_pos = pos_user * (times.size + 1) + inverse[:pos_time.size]
        key_neg = user * (times.size + 1) + inverse[pos_time.size:]
        end = np.searchsorted(key_pos, key_neg, side="left")  # rows are sorted by (user, time)
        history = range_lists(pos_item, np.maximum(user_start[user], end - history_len), end)
    split = _given_split(rows.column("split").combine_chunks(), np.zeros(rows.num_rows, dtype=np.int8))
    cold = is_cold_user[user]
    if "cold" in rows.column_names:
        cold = _given_flags(rows.column("cold").combine_chunks(), cold)
    return GivenNegatives(user=user, item=item, timestamp=timestamp, split=split, history=history, is_cold=cold)
