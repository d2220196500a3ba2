"""The canonical raw tables every source reader returns, the bad-row report, and the source registry.

A source reader (synthetic generator, MovieLens, later Amazon JSON, RecBole atomic, generic CSV/parquet)
turns its files into one :class:`RawData`:

* ``interactions`` (:data:`RAW_INTERACTIONS_SCHEMA`): raw user id, raw item id, rating (null for implicit
  feedback), unix timestamp, review text (null where the source has none);
* ``items`` (:data:`RAW_ITEMS_SCHEMA`): every catalogue item with its title (items nobody interacted with are
  kept: they are valid negatives);
* ``bad_rows``: every malformed input row, counted by reason with the first few ``file:line`` examples.

Everything after that (contiguous ids, the per-user time split, cold flags, prompts) is shared code in
``ckf_dist.data.canonical`` and ``ckf_dist.data.prompts``. To add a source, write a reader
``read(cfg: DataConfig) -> RawData`` and add it to :data:`SOURCES` (and to ``data.source`` in
``ckf_dist.config.validate``).
"""
from __future__ import annotations

import hashlib
import importlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from ckf_dist.config import DataConfig
from ckf_dist.data.schema import PLACEHOLDER

RAW_INTERACTIONS_SCHEMA = pa.schema([
    ("raw_user_id", pa.string()),
    ("raw_item_id", pa.string()),
    ("rating", pa.float32()),  # null = implicit feedback
    ("timestamp", pa.int64()),  # unix seconds
    ("review", pa.string()),  # null = no review text
])

# Optional per-row benchmark-protocol columns a reader may append to the interactions, in this order (the
# generic source does, from columns of the same names; see ckf_dist.data.generic). Null = not given for the row.
PROTOCOL_FIELDS = {
    "split": pa.field("split", pa.string()),  # train | valid | test: replaces the per-user time split
    "history": pa.field("history", pa.list_(pa.string())),  # raw item ids, oldest first: replaces the log history
    "candidates": pa.field("candidates", pa.list_(pa.string())),  # top-K candidates incl. the target, in order
    "cold": pa.field("cold", pa.bool_()),  # the row's warm/cold flag as published
    "label": pa.field("label", pa.int8()),  # data.ctr_labels=given: 1/0 as given; label-0 rows are no interactions
}

RAW_ITEMS_SCHEMA = pa.schema([
    ("raw_item_id", pa.string()),
    ("title", pa.string()),
])

# source name -> "module:function" (imported lazily so one broken optional reader never breaks the others)
SOURCES: dict[str, str] = {
    "synthetic": "ckf_dist.data.synthetic:read",
    "movielens-100k": "ckf_dist.data.movielens:read_100k",
    "movielens-1m": "ckf_dist.data.movielens:read_1m",
    "amazon-reviews": "ckf_dist.data.amazon:read",
    "recbole": "ckf_dist.data.recbole:read",
    "generic": "ckf_dist.data.generic:read",
}


class BadRows:
    """Counts malformed input rows by reason and keeps the first ``max_examples`` of them verbatim.

    Readers call :meth:`add` for every row they skip; nothing is dropped without being counted here.
    """

    def __init__(self, max_examples: int = 10):
        self.max_examples = max_examples
        self.by_reason: Counter[str] = Counter()
        self.examples: list[dict[str, Any]] = []

    def add(self, file: str, line: int, reason: str, text: str = "", kind: str | None = None) -> None:
        """Records one bad row. ``kind`` is the counting key (defaults to ``reason``); ``reason`` may carry
        row-specific detail (the offending value) for the examples."""
        self.by_reason[kind or reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"file": file, "line": int(line), "reason": reason, "text": text[:200]})

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.by_reason.items())), "examples": list(self.examples)}

    def summary(self) -> str:
        """One human-readable paragraph: totals by reason and the examples as ``file:line: reason``."""
        if not self.total:
            return "no bad rows"
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.by_reason.items()))
        lines = [f"{self.total} bad rows skipped after counting ({reasons}); first ones:"]
        lines += [f"  {e['file']}:{e['line']}: {e['reason']}: {e['text']!r}" for e in self.examples]
        return "\n".join(lines)


@dataclass
class RawData:
    """What a source reader returns; see the module docstring."""

    source: str
    interactions: pa.Table
    items: pa.Table
    bad_rows: BadRows = field(default_factory=BadRows)
    files: list[str] = field(default_factory=list)  # the input files read, for the manifest
    extras: dict[str, Any] = field(default_factory=dict)  # source-specific facts (e.g. the planted clusters)
    notes: list[str] = field(default_factory=list)  # human-readable facts for the manifest (fallback titles, ...)

    def protocol(self, name: str) -> pa.Array | None:
        """The optional protocol column ``name`` of :data:`PROTOCOL_FIELDS` (None when the reader gave none)."""
        if name not in self.interactions.column_names:
            return None
        return self.interactions.column(name).combine_chunks()

    @property
    def has_ratings(self) -> bool:
        return self.interactions.num_rows > 0 and self.interactions.column("rating").null_count < self.interactions.num_rows

    @property
    def has_reviews(self) -> bool:
        return self.interactions.num_rows > 0 and self.interactions.column("review").null_count < self.interactions.num_rows

    def validate(self) -> "RawData":
        """Checks the reader's contract; raises ValueError naming the source and the problem."""
        where = f"source {self.source!r}"
        schema = self.interactions.schema
        base = pa.schema(list(schema)[:len(RAW_INTERACTIONS_SCHEMA)])
        extra = list(schema)[len(RAW_INTERACTIONS_SCHEMA):]
        if not base.equals(RAW_INTERACTIONS_SCHEMA) or [f.name for f in extra] != [
                n for n in PROTOCOL_FIELDS if n in schema.names] or any(not f.equals(PROTOCOL_FIELDS[f.name]) for f in extra):
            raise ValueError(f"{where}: interactions schema {schema} != {RAW_INTERACTIONS_SCHEMA} (plus optional "
                             f"protocol columns {list(PROTOCOL_FIELDS.values())} in that order)")
        if not self.items.schema.equals(RAW_ITEMS_SCHEMA):
            raise ValueError(f"{where}: items schema {self.items.schema} != {RAW_ITEMS_SCHEMA}")
        if self.interactions.num_rows == 0:
            raise ValueError(f"{where}: no valid interactions ({self.bad_rows.summary()})")
        for name in ("raw_user_id", "raw_item_id", "timestamp"):
            if self.interactions.column(name).null_count:
                raise ValueError(f"{where}: interactions.{name} has nulls")
        if self.items.column("raw_item_id").null_count:
            raise ValueError(f"{where}: items.raw_item_id has nulls")
        ids = self.items.column("raw_item_id")
        if len(pc.unique(ids)) != len(ids):
            raise ValueError(f"{where}: items.raw_item_id has duplicates")
        unknown = pc.invert(pc.is_in(self.interactions.column("raw_item_id"), value_set=ids.combine_chunks()))
        if pc.any(unknown).as_py():
            first = self.interactions.column("raw_item_id").filter(unknown)[0].as_py()
            raise ValueError(f"{where}: interaction item {first!r} is not in the item table "
                             "(readers must report unknown items as bad rows)")
        return self


def clean_text_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Collapses whitespace and defuses literal placeholder tokens (so they cannot be mistaken for soft tokens);
    nulls stay null and empty strings become null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    out = pc.replace_substring(values, PLACEHOLDER, "(cf)")
    out = pc.utf8_trim_whitespace(pc.replace_substring_regex(out, r"\s+", " "))
    return pc.if_else(pc.equal(out, ""), pa.scalar(None, pa.string()), out)


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[a-z][.!?])(?=[A-Z])")


def review_sentence(text: str | None, min_words: int = 4, max_words: int = 40) -> str | None:
    """The review sentence used as an explanation answer (and review_rating input), deterministically: the first
    sentence with at least ``min_words`` words (sentences end at ``.!?`` followed by a space, or by a capital
    letter as in "cheap.It works"), cut to its first ``max_words`` words; when no sentence is that long, the
    whole review cut to ``max_words`` words. Whitespace is collapsed, so the result is a substring of the
    whitespace-collapsed review. None or an empty review gives None."""
    if text is None:
        return None
    text = " ".join(text.split())
    if not text:
        return None
    for sentence in _SENTENCE_SPLIT.split(text):
        words = sentence.split()
        if len(words) >= min_words:
            return " ".join(words[:max_words])
    return " ".join(text.split()[:max_words])


def review_sentences(values: pa.Array | pa.ChunkedArray, min_words: int, max_words: int) -> pa.Array:
    """:func:`review_sentence` over an Arrow string array (nulls stay null)."""
    return pa.array([review_sentence(v, min_words, max_words) for v in values.to_pylist()], pa.string())


def user_sample_keys(raw_user_ids: list[str], seed: int) -> list[int]:
    """A stable pseudo-random key per raw user id (sha256 of ``"<seed>:<id>"``): independent of file order,
    platform and Python's hash randomisation."""
    return [int.from_bytes(hashlib.sha256(f"{seed}:{u}".encode()).digest()[:8], "big") for u in raw_user_ids]


def sample_users(raw: RawData, max_users: int, seed: int) -> RawData:
    """Keeps the ``max_users`` users with the smallest :func:`user_sample_keys` (all of them when ``max_users``
    is 0 or not smaller than the user count); the item catalogue is kept whole. Adds a note saying so."""
    users = pc.unique(raw.interactions.column("raw_user_id")).to_pylist()
    if max_users <= 0 or max_users >= len(users):
        return raw
    keys = user_sample_keys(users, seed)
    kept = [u for _, u in sorted(zip(keys, users))[:max_users]]
    mask = pc.is_in(raw.interactions.column("raw_user_id"), value_set=pa.array(kept, pa.string()))
    raw.interactions = raw.interactions.filter(mask)
    raw.notes.append(f"data.max_users={max_users}: kept a deterministic sample of {max_users} of {len(users)} users "
                     f"({raw.interactions.num_rows} interactions; sha256 of seed and raw user id)")
    return raw


def read_source(cfg: DataConfig) -> RawData:
    """Runs the reader registered for ``cfg.source``, applies ``data.max_users`` and validates the output."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} has no reader; known: {sorted(SOURCES)}")
    module_name, func_name = SOURCES[cfg.source].split(":")
    reader: Callable[[DataConfig], RawData] = getattr(importlib.import_module(module_name), func_name)
    return sample_users(reader(cfg), cfg.max_users, cfg.seed).validate()
