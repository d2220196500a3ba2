"""MovieLens readers (GroupLens). ML-100K: ``u.data`` (user, item, rating, unix time; tab separated) and
``u.item`` (pipe separated, latin-1: item id, title, release date, ..., 19 genre flags). ML-1M:
``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat`` (``MovieID::Title::Genres``),
both latin-1.

Malformed rows are counted in a :class:`~ckf_dist.data.raw.BadRows` report with their ``file:line`` and
reason, then skipped: a wrong field count, a non-integer id, a rating that is not a number in 1..5, a
non-integer or negative timestamp, an interaction with an item missing from the item file, a duplicate item id
in the item file. MovieLens has no review text, so the explanation task is skipped for it (reported in the manifest).
Files are read through ``ckf_dist.data.io.get_filesystem``, so ``data.raw_path`` may also be ``s3://...``.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ckf_dist.config import DataConfig
from ckf_dist.data.io import get_filesystem, join, read_text
from ckf_dist.data.raw import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, BadRows, RawData

ITEM_FIELDS = 24  # id, title, release date, video release date, IMDb URL, 19 genre flags
INT_RE = r"^[+-]?\d{1,18}$"  # fits int64 (fields are whitespace-trimmed first)
NUM_RE = r"^[+-]?(\d{1,18}(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?$"


def _int(value: str) -> int | None:
    """An ASCII decimal integer that fits int64, else None."""
    value = value.strip()
    return int(value) if re.fullmatch(INT_RE, value, flags=re.ASCII) else None


def _lines(text: str):
    """(1-based line number, line) for every line; a final newline does not make an extra empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return enumerate((ln.rstrip("\r") for ln in lines), start=1)


def read_u_item(text: str, file: str, bad: BadRows, sep: str = "|", num_fields: int = ITEM_FIELDS) -> dict[str, str]:
    """Item id (canonical decimal string) -> title, from the text of ``u.item`` (or, with ``sep="::"`` and
    ``num_fields=3``, of ML-1M's ``movies.dat``)."""
    titles: dict[str, str] = {}
    for lineno, line in _lines(text):
        if not line.strip():
            bad.add(file, lineno, "empty line", line)
            continue
        parts = line.split(sep)
        if len(parts) != num_fields:
            bad.add(file, lineno, f"expected {num_fields} {sep!r}-separated fields, got {len(parts)}", line,
                    kind="wrong field count")
            continue
        item = _int(parts[0])
        if item is None:
            bad.add(file, lineno, f"item id {parts[0]!r} is not an integer", line, kind="non-integer id")
            continue
        key = str(item)
        if key in titles:
            bad.add(file, lineno, f"duplicate item id {item}", line, kind="duplicate item id")
            continue
        titles[key] = parts[1].strip()
    return titles


def parse_u_data_line(line: str, known_items: dict[str, str], sep: str = "\t",
                      item_file: str = "u.item") -> tuple[tuple | None, str, str]:
    """One ``u.data`` line (or ``ratings.dat`` line with ``sep="::"``) -> ((user, item, rating, timestamp), "", "")
    or (None, reason, counting kind)."""
    parts = line.split(sep)
    if len(parts) != 4:
        if not line.strip():
            return None, "empty line", "empty line"
        return None, f"expected 4 {sep!r}-separated fields, got {len(parts)}", "wrong field count"
    user, item, ts = _int(parts[0]), _int(parts[1]), _int(parts[3])
    if user is None or item is None:
        field, value = ("user", parts[0]) if user is None else ("item", parts[1])
        return None, f"{field} id {value!r} is not an integer", "non-integer id"
    try:
        rating = float(parts[2])
    except ValueError:
        rating = math.nan
    if not 1.0 <= rating <= 5.0:  # also catches NaN
        return None, f"rating {parts[2]!r} is not a number in 1..5", "rating outside 1-5"
    if ts is None or ts < 0:
        return None, f"timestamp {parts[3]!r} is not a non-negative integer", "bad timestamp"
    if str(item) not in known_items:
        return None, f"item id {item} is not in {item_file}", "unknown item id"
    return (str(user), str(item), rating, ts), "", ""


def read_u_data(text: str, file: str, known_items: dict[str, str], bad: BadRows, sep: str = "\t",
                item_file: str = "u.item") -> pa.Table:
    """Interactions from the text of ``u.data`` (or ML-1M ``ratings.dat`` with ``sep="::"``;
    RAW_INTERACTIONS_SCHEMA, no reviews).

    Vectorised with Arrow string kernels; only the lines that fail a check go through
    :func:`parse_u_data_line`, which names the reason for the bad-row report.
    """
    lines = pa.array([ln for _, ln in _lines(text)], pa.string())
    parts = pc.split_pattern(lines, sep)
    four = pc.equal(pc.list_value_length(parts), 4).to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(four)
    fields = [pc.utf8_trim_whitespace(pc.list_element(parts.filter(pa.array(four)), k)) for k in range(4)]
    valid = np.ones(idx.size, dtype=bool)
    for k in (0, 1, 3):
        valid &= pc.match_substring_regex(fields[k], INT_RE).to_numpy(zero_copy_only=False)
    valid &= pc.match_substring_regex(fields[2], NUM_RE).to_numpy(zero_copy_only=False)
    sel = pa.array(valid)
    user = pc.cast(pc.cast(fields[0].filter(sel), pa.int64()), pa.string())
    item = pc.cast(pc.cast(fields[1].filter(sel), pa.int64()), pa.string())
    rating = pc.cast(fields[2].filter(sel), pa.float64()).to_numpy()
    ts = pc.cast(fields[3].filter(sel), pa.int64()).to_numpy()
    keep = ((rating >= 1.0) & (rating <= 5.0) & (ts >= 0)
            & pc.is_in(item, value_set=pa.array(list(known_items), pa.string())).to_numpy(zero_copy_only=False))
    good_rows = idx[valid][keep]

    table = pa.table({
        "raw_user_id": user.filter(pa.array(keep)),
        "raw_item_id": item.filter(pa.array(keep)),
        "rating": pa.array(rating[keep], pa.float32()),
        "timestamp": pa.array(ts[keep], pa.int64()),
        "review": pa.nulls(int(keep.sum()), pa.string()),
    }, schema=RAW_INTERACTIONS_SCHEMA)
    rejected = np.setdiff1d(np.arange(len(lines)), good_rows)
    rescued = []  # lines the slow path accepts (e.g. unusual whitespace the regexes reject)
    for row in rejected.tolist():
        line = lines[row].as_py()
        parsed, reason, kind = parse_u_data_line(line, known_items, sep, item_file)
        if parsed is None:
            bad.add(file, row + 1, reason, line, kind=kind)
        else:
            rescued.append(parsed)
    if rescued:
        u, i, r, t = zip(*rescued)
        table = pa.concat_tables([table, pa.table({
            "raw_user_id": pa.array(u, pa.string()), "raw_item_id": pa.array(i, pa.string()),
            "rating": pa.array(r, pa.float32()), "timestamp": pa.array(t, pa.int64()),
            "review": pa.nulls(len(u), pa.string())}, schema=RAW_INTERACTIONS_SCHEMA)])
    return table


def read_100k(cfg: DataConfig) -> RawData:
    """The ``movielens-100k`` source: ``data.raw_path`` is the folder holding ``u.data`` and ``u.item``."""
    fs, folder = get_filesystem(cfg.raw_path, cfg.s3)
    data_file, item_file = join(folder, "u.data"), join(folder, "u.item")
    shown = {data_file: join(cfg.raw_path, "u.data"), item_file: join(cfg.raw_path, "u.item")}
    bad = BadRows()
    item_text = read_text(fs, item_file, encoding="latin-1", display=shown[item_file])
    data_text = read_text(fs, data_file, encoding="utf-8", display=shown[data_file])
    titles = read_u_item(item_text, shown[item_file], bad)
    interactions = read_u_data(data_text, shown[data_file], titles, bad)
    items = pa.table({"raw_item_id": pa.array(list(titles), pa.string()),
                      "title": pa.array(list(titles.values()), pa.string())}, schema=RAW_ITEMS_SCHEMA)
    return RawData(source="movielens-100k", interactions=interactions, items=items, bad_rows=bad,
                   files=[shown[data_file], shown[item_file]])


def read_1m(cfg: DataConfig) -> RawData:
    """The ``movielens-1m`` source: ``data.raw_path`` is the folder holding ``ratings.dat`` and ``movies.dat``
    (``::``-separated, latin-1; ``users.dat`` is not needed)."""
    fs, folder = get_filesystem(cfg.raw_path, cfg.s3)
    data_file, item_file = join(folder, "ratings.dat"), join(folder, "movies.dat")
    shown = {data_file: join(cfg.raw_path, "ratings.dat"), item_file: join(cfg.raw_path, "movies.dat")}
    bad = BadRows()
    item_text = read_text(fs, item_file, encoding="latin-1", display=shown[item_file])
    data_text = read_text(fs, data_file, encoding="latin-1", display=shown[data_file])
    titles = read_u_item(item_text, shown[item_file], bad, sep="::", num_fields=3)
    interactions = read_u_data(data_text, shown[data_file], titles, bad, sep="::", item_file="movies.dat")
    items = pa.table({"raw_item_id": pa.array(list(titles), pa.string()),
                      "title": pa.array(list(titles.values()), pa.string())}, schema=RAW_ITEMS_SCHEMA)
    return RawData(source="movielens-1m", interactions=interactions, items=items, bad_rows=bad,
                   files=[shown[data_file], shown[item_file]])
