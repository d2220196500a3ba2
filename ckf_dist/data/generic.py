"""A generic interaction table, the ``generic`` source: one CSV/TSV (``.csv``, ``.tsv``, ``.txt``, optionally
``.gz``) or parquet file named by ``data.raw_path``.

Columns (canonical name -> column in the file through ``data.column_map``; unmapped names are looked up as
themselves):

* ``user``, ``item`` (required): ids, read as strings;
* ``timestamp`` (required): unix seconds (integer or float), or an ISO-8601 date/time string, or a parquet
  timestamp column;
* ``rating`` (1..5, explicit feedback) or ``label`` (0/1, implicit): with neither every row is a positive
  implicit interaction; label-0 rows are explicit negatives and are left out of the interaction log (the
  manifest notes how many): prompts sample negatives from the items a user never interacted with;
* ``title``, ``review`` (optional): item title (the first non-empty one per item in file order wins) and review
  text (feeds the explanation and review_rating tasks).

Benchmark-protocol columns (optional; README "Benchmark protocols"), to train and evaluate on a published split:

* ``split`` (train/valid/test): the row's split, used instead of the per-user time split;
* ``history``: the row's history as ordered item ids (oldest first; a parquet list or a ``data.list_delimiter``-
  separated CSV field), used instead of the history built from the log for every row (empty or null = the user
  is new);
* ``candidates``: the row's top-K candidate list (``data.num_candidates`` distinct items including the row's item,
  in the order shown), used instead of sampled negatives;
* ``cold`` (0/1): the row's warm/cold flag as published, used instead of ``data.cold_user_max_interactions``;
* with ``data.ctr_labels=given`` (needs ``label`` and ``split``): every row is a CTR row with its label as given
  (no sampled negatives); label-0 rows stay out of the interaction log.

A null ``split``, ``candidates`` or ``cold`` means "not given" for that row (the rule applies); an invalid value
is a bad row.

``data.meta_path`` may name an item table (CSV/parquet, columns ``item`` and ``title`` through the same
``column_map``): it then defines the catalogue, and interactions with items missing from it are bad rows.

CSV files must hold one record per line (no newlines inside quoted values); ``data.csv_delimiter`` sets the
delimiter (``.tsv`` files use a tab). Bad rows (wrong field count, empty line, missing user/item/timestamp,
rating outside 1..5, label not 0/1, bad timestamp, unknown item) are counted with ``file:line`` (parquet:
``file:row``, 1-based).
"""
from __future__ import annotations

import csv
import datetime as _dt
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ckf_dist.config import DataConfig
from ckf_dist.data.io import decompressed_text, get_filesystem, read_bytes
from ckf_dist.data.raw import PROTOCOL_FIELDS, RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, BadRows, RawData

PROTOCOL_COLUMNS = ("split", "history", "candidates", "cold")  # optional per-row protocol columns (module docstring)
SPLIT_NAMES = ("train", "valid", "test")
NUM_RE = r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"
TRUE_LABELS = {"1", "1.0", "true", "yes"}
FALSE_LABELS = {"0", "0.0", "false", "no"}


def _is_parquet(name: str) -> bool:
    return name.lower().endswith((".parquet", ".pq"))


def read_table(fs, path: str, shown: str, delimiter: str, bad: BadRows) -> tuple[pa.Table, np.ndarray, str]:
    """(table with every column as string, timestamp or (parquet) list, 1-based line/row number of each row, display name).
    Malformed CSV lines (wrong field count, empty) are bad rows."""
    data = read_bytes(fs, path, shown)
    if _is_parquet(shown):
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{shown}: not a readable parquet file ({exc})") from exc
        cols = {n: (c if pa.types.is_timestamp(c.type) or pa.types.is_list(c.type) or pa.types.is_large_list(c.type)
                    else pc.cast(c, pa.string())) for n, c in
                zip(table.column_names, table.columns)}
        return pa.table(cols), np.arange(1, table.num_rows + 1), shown
    text, shown = decompressed_text(data, shown)
    if shown.lower().removesuffix(".gz").endswith(".tsv"):
        delimiter = "\t"
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{shown}: empty file (expected a header line)")
    names = next(csv.reader([lines[0].rstrip("\r")], delimiter=delimiter), [])
    if not any(n.strip() for n in names):
        raise ValueError(f"{shown}:1: empty header line")
    invalid: list[tuple[str, int, int]] = []

    def handler(row) -> str:
        invalid.append((row.text, row.expected_columns, row.actual_columns))
        return "skip"

    table = pacsv.read_csv(
        io.BytesIO(text.encode("utf-8")),
        read_options=pacsv.ReadOptions(use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=handler, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True))
    # one record per line: every data line is a valid row or an invalid one, both in file order
    line_of_valid, pos = [], 1
    for text_bad, expected, actual in invalid:
        while pos < len(lines) and lines[pos].rstrip("\r") != text_bad.rstrip("\r"):
            line_of_valid.append(pos + 1)
            pos += 1
        reason = "empty line" if not text_bad.strip() else f"expected {expected} fields, got {actual}"
        bad.add(shown, pos + 1, reason, text_bad, kind="empty line" if not text_bad.strip() else "wrong field count")
        pos += 1
    line_of_valid.extend(range(pos + 1, len(lines) + 1))
    if len(line_of_valid) != table.num_rows:  # e.g. quoted newlines: fall back to row positions
        line_of_valid = list(range(2, table.num_rows + 2))
        return table, np.asarray(line_of_valid, dtype=np.int64), shown
    line_numbers = np.asarray(line_of_valid, dtype=np.int64)
    blank = np.fromiter((not lines[n - 1].strip() for n in line_of_valid), dtype=bool, count=len(line_of_valid))
    for n in line_numbers[blank].tolist():  # Arrow reads an empty line as an all-null row
        bad.add(shown, n, "empty line", "")
    if blank.any():
        table, line_numbers = table.filter(pa.array(~blank)), line_numbers[~blank]
    return table, line_numbers, shown


def _resolve(table: pa.Table, cmap: dict, key: str, shown: str, required: bool = False,
             strict: bool = True) -> str | None:
    """The file column for canonical ``key`` (None when absent and optional); ValueError names the key. A key
    mapped in ``data.column_map`` must exist unless ``strict`` is False."""
    name = cmap.get(key, key)
    if name in table.column_names:
        return name
    if required or (strict and key in cmap):
        raise ValueError(f"{shown}: no column {name!r} for {key!r} (columns: {table.column_names}); "
                         f"set data.column_map.{key}")
    return None


def _flat(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _trimmed(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Whitespace-trimmed strings; empty -> null."""
    out = pc.utf8_trim_whitespace(_flat(col))
    return pc.if_else(pc.equal(out, ""), pa.scalar(None, pa.string()), out)


def _timestamps(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 unix seconds, valid mask) from a timestamp column or strings (numbers or ISO-8601)."""
    col = _flat(col)
    if pa.types.is_timestamp(col.type):
        secs = pc.cast(pc.cast(col, pa.timestamp("s", tz=col.type.tz)), pa.int64())
        valid = pc.is_valid(secs).to_numpy(zero_copy_only=False)
        return np.nan_to_num(secs.to_numpy(zero_copy_only=False).astype(np.float64)).astype(np.int64), valid
    s = _trimmed(col)
    numeric = pc.fill_null(pc.match_substring_regex(s, NUM_RE), False).to_numpy(zero_copy_only=False)
    out = np.zeros(len(s), dtype=np.int64)
    valid = np.zeros(len(s), dtype=bool)
    if numeric.any():
        vals = pc.cast(s.filter(pa.array(numeric)), pa.float64()).to_numpy()
        ok = np.isfinite(vals) & (vals >= 0) & (vals < 2**62)
        idx = np.flatnonzero(numeric)
        out[idx[ok]] = vals[ok].astype(np.int64)
        valid[idx[ok]] = True
    for i in np.flatnonzero(~numeric & pc.is_valid(s).to_numpy(zero_copy_only=False)).tolist():
        try:
            dt = _dt.datetime.fromisoformat(s[i].as_py().replace("Z", "+00:00"))
        except ValueError:
            continue
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=_dt.timezone.utc)
        if dt.timestamp() >= 0:
            out[i], valid[i] = int(dt.timestamp()), True
    return out, valid


def _id_lists(col: pa.Array | pa.ChunkedArray, delimiter: str) -> pa.ListArray:
    """list<string> of trimmed item ids from a parquet list column or a ``delimiter``-separated string column
    ("" -> an empty list, null -> null)."""
    col = _flat(col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lists = pc.cast(col, pa.list_(pa.string()))
        return pa.ListArray.from_arrays(lists.offsets, pc.utf8_trim_whitespace(lists.values), mask=lists.is_null())
    text = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    parts = pc.split_pattern(text, delimiter)
    empty = pc.fill_null(pc.equal(text, ""), False)
    lists = pa.ListArray.from_arrays(parts.offsets, pc.utf8_trim_whitespace(parts.values), mask=parts.is_null())
    return pc.if_else(empty, pa.scalar([], pa.list_(pa.string())), lists)


def _flags(col) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true, false, null) masks of a 0/1 / true/false column."""
    lab = pc.utf8_lower(_trimmed(col)).to_pylist()
    true = np.array([v in TRUE_LABELS for v in lab], dtype=bool)
    false = np.array([v in FALSE_LABELS for v in lab], dtype=bool)
    null = np.array([v is None for v in lab], dtype=bool)
    return true, false, null


def _row_of_values(lists: pa.ListArray) -> np.ndarray:
    return pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)


def _rows_with(lists: pa.ListArray, value_mask: np.ndarray, n: int) -> np.ndarray:
    """[n] bool: rows with at least one list value where ``value_mask`` holds."""
    out = np.zeros(n, dtype=bool)
    out[_row_of_values(lists)[value_mask]] = True
    return out


def _protocol_columns(table: pa.Table, cols: dict, item: pa.Array, known: pa.Array | None, cfg: DataConfig,
                      reject) -> dict[str, pa.Array]:
    """The protocol columns present in the file, parsed; invalid values are rejected as bad rows (``reject``)."""
    n, out = table.num_rows, {}
    if cols["split"]:
        split = pc.utf8_lower(_trimmed(table.column(cols["split"])))
        valid = pc.fill_null(pc.is_in(split, value_set=pa.array(SPLIT_NAMES)), False).to_numpy(zero_copy_only=False)
        reject(~valid & pc.is_valid(split).to_numpy(zero_copy_only=False),
               f"split ({cols['split']!r}) is not train, valid or test", "bad split")
        out["split"] = split
        if cfg.ctr_labels == "given":  # every row needs one: no per-user rule can place a given CTR row
            reject(~valid, f"split ({cols['split']!r}) missing (data.ctr_labels=given)", "bad split")
    if cols["cold"]:
        true, false, null = _flags(table.column(cols["cold"]))
        reject(~(true | false | null), f"cold ({cols['cold']!r}) is not 0/1", "bad cold flag")
        out["cold"] = pa.array(true, mask=null)
    for name in ("history", "candidates"):
        if not cols[name]:
            continue
        lists = _id_lists(table.column(cols[name]), cfg.list_delimiter)
        values = lists.values.slice(lists.offsets[0].as_py(), lists.offsets[-1].as_py() - lists.offsets[0].as_py())
        reject(_rows_with(lists, pc.equal(values, "").to_numpy(zero_copy_only=False), n),
               f"{name} ({cols[name]!r}) has an empty item id", f"bad {name}")
        if known is not None:
            unknown = ~pc.fill_null(pc.is_in(values, value_set=known), False).to_numpy(zero_copy_only=False)
            reject(_rows_with(lists, unknown, n), f"{name} ({cols[name]!r}) names an item not in the item file",
                   "unknown item id")
        if name == "candidates":
            length = pc.fill_null(pc.list_value_length(lists), cfg.num_candidates).to_numpy(zero_copy_only=False)
            reject(length != cfg.num_candidates, f"candidates ({cols[name]!r}) is not a list of data.num_candidates="
                   f"{cfg.num_candidates} items", "bad candidates")
            parent = _row_of_values(lists)
            is_target = pc.fill_null(pc.equal(values, item.take(pa.array(parent))), False).to_numpy(
                zero_copy_only=False)
            hits = np.bincount(parent[is_target], minlength=n)
            reject(pc.is_valid(lists).to_numpy(zero_copy_only=False) & (hits != 1),
                   f"candidates ({cols[name]!r}) must hold the row's item exactly once", "bad candidates")
            pairs = pa.table({"row": pa.array(parent), "item": values}).group_by(["row", "item"]).aggregate(
                [("item", "count")])
            dup_rows = pairs.filter(pc.greater(pairs.column("item_count"), 1)).column("row").to_numpy()
            duplicated = np.zeros(n, dtype=bool)
            duplicated[dup_rows] = True
            reject(duplicated, f"candidates ({cols[name]!r}) lists an item twice", "bad candidates")
        if name == "history":  # the file defines every row's history: a null one is empty
            lists = pc.if_else(lists.is_null(), pa.scalar([], pa.list_(pa.string())), lists)
        out[name] = lists
    return out


def read_items_file(cfg: DataConfig, bad: BadRows) -> tuple[dict[str, str | None], str]:
    """item -> title from ``data.meta_path`` (first non-empty title per item wins)."""
    fs, path = get_filesystem(cfg.meta_path, cfg.s3)
    table, lines, shown = read_table(fs, path, cfg.meta_path, cfg.csv_delimiter, bad)
    cmap = dict(cfg.column_map)
    item_col = _resolve(table, cmap, "item", shown, required=True)
    title_col = _resolve(table, cmap, "title", shown, required=True)
    items, titles = _trimmed(table.column(item_col)).to_pylist(), _trimmed(table.column(title_col)).to_pylist()
    out: dict[str, str | None] = {}
    for line, item, title in zip(lines.tolist(), items, titles):
        if item is None:
            bad.add(shown, line, "missing item id", f"{item}\t{title}", kind="missing field")
            continue
        if out.get(item) is None:
            out[item] = title
    return out, shown


def read(cfg: DataConfig) -> RawData:
    """The ``generic`` source (see the module docstring)."""
    fs, path = get_filesystem(cfg.raw_path, cfg.s3)
    bad, notes = BadRows(), []
    table, lines, shown = read_table(fs, path, cfg.raw_path, cfg.csv_delimiter, bad)
    cmap = dict(cfg.column_map)
    cols = {k: _resolve(table, cmap, k, shown, required=k in ("user", "item", "timestamp"),
                        strict=not (k == "title" and cfg.meta_path))  # titles may live in the items file only
            for k in ("user", "item", "timestamp", "rating", "label", "title", "review") + tuple(PROTOCOL_COLUMNS)}
    if cols["rating"] and cols["label"] and "label" in cmap and "rating" in cmap:
        raise ValueError(f"{shown}: data.column_map maps both 'rating' and 'label'; map one")
    n = table.num_rows
    user, item = _trimmed(table.column(cols["user"])), _trimmed(table.column(cols["item"]))
    ts, ts_ok = _timestamps(table.column(cols["timestamp"]))
    reasons = np.full(n, "", dtype=object)
    kinds = np.full(n, "", dtype=object)

    def reject(mask: np.ndarray, reason: str, kind: str) -> None:
        new = mask & (kinds == "")
        reasons[new], kinds[new] = reason, kind

    reject(~pc.is_valid(user).to_numpy(zero_copy_only=False), f"missing user ({cols['user']!r})", "missing field")
    reject(~pc.is_valid(item).to_numpy(zero_copy_only=False), f"missing item ({cols['item']!r})", "missing field")
    reject(~ts_ok, f"timestamp ({cols['timestamp']!r}) is not unix seconds or an ISO-8601 date", "bad timestamp")
    rating = np.full(n, np.nan, dtype=np.float32)
    keep_label = np.ones(n, dtype=bool)
    use_label = bool(cols["label"]) and ("label" in cmap or not cols["rating"])  # an explicit label mapping wins
    if cols["rating"] and not use_label:
        r = _trimmed(table.column(cols["rating"]))
        num = pc.fill_null(pc.match_substring_regex(r, NUM_RE), False).to_numpy(zero_copy_only=False)
        vals = np.full(n, np.nan)
        vals[num] = pc.cast(r.filter(pa.array(num)), pa.float64()).to_numpy()
        reject(~((vals >= 1) & (vals <= 5)), f"rating ({cols['rating']!r}) is not a number in 1..5", "rating outside 1-5")
        rating = vals.astype(np.float32)
    elif use_label:
        pos, neg, _ = _flags(table.column(cols["label"]))
        reject(~(pos | neg), f"label ({cols['label']!r}) is not 0/1", "bad label")
        keep_label = pos
    given_labels = cfg.ctr_labels == "given"
    if given_labels and not use_label:
        raise ValueError(f"{shown}: data.ctr_labels=given needs a 0/1 label column (columns: {table.column_names}); "
                         "set data.column_map.label")
    if given_labels and not cols["split"]:
        raise ValueError(f"{shown}: data.ctr_labels=given needs a split column (train/valid/test per row; columns: "
                         f"{table.column_names}); set data.column_map.split")
    titles: dict[str, str | None]
    item_shown, known = "", None
    if cfg.meta_path:
        titles, item_shown = read_items_file(cfg, bad)
        known = pa.array(list(titles), pa.string())
        reject(~pc.fill_null(pc.is_in(item, value_set=known), False).to_numpy(zero_copy_only=False),
               f"item not in {item_shown}", "unknown item id")
    protocol = _protocol_columns(table, cols, item, known, cfg, reject)
    if given_labels:
        keep_label = np.ones(n, dtype=bool)  # label-0 rows are CTR rows; canonical keeps them out of the log
        protocol["label"] = pa.array(pos.astype(np.int8))
    ok = kinds == ""
    if not ok.all():
        row_text = {c: _flat(table.column(c)) for c in dict.fromkeys(v for v in cols.values() if v)}
        for i in np.flatnonzero(~ok).tolist():
            text = ", ".join(f"{c}={row_text[c][i].as_py()!r}" for c in row_text if c != cols["review"])
            bad.add(shown, int(lines[i]), str(reasons[i]), text, kind=str(kinds[i]))
    negatives = int((ok & ~keep_label).sum())
    if given_labels:
        notes.append(f"data.ctr_labels=given: {int((ok & ~pos).sum())} label-0 rows are CTR negatives as given "
                     "(not interactions); no negatives are sampled for CTR")
    elif negatives:
        notes.append(f"{negatives} label-0 rows (explicit negatives) are not interactions; prompts sample "
                     "negatives from never-interacted items")
    sel = pa.array(ok & keep_label)
    review = _trimmed(table.column(cols["review"])).filter(sel) if cols["review"] else pa.nulls(int(sel.true_count), pa.string())
    interactions = pa.table({
        "raw_user_id": user.filter(sel), "raw_item_id": item.filter(sel),
        "rating": pa.array(rating, pa.float32(), mask=np.isnan(rating)).filter(sel),
        "timestamp": pa.array(ts).filter(sel), "review": review}, schema=RAW_INTERACTIONS_SCHEMA)
    for name, field in PROTOCOL_FIELDS.items():  # in the fixed order RawData.validate checks
        if name in protocol:
            interactions = interactions.append_column(field, pc.cast(protocol[name], field.type).filter(sel))
    if not cfg.meta_path:
        inline = _trimmed(table.column(cols["title"])).filter(sel).to_pylist() if cols["title"] else None
        titles = {}
        for k, it in enumerate(interactions.column("raw_item_id").to_pylist()):
            if titles.get(it) is None:
                titles[it] = inline[k] if inline else None
        for name in ("history", "candidates"):  # items named only in a list still belong to the catalogue
            if name in protocol:
                for it in pc.unique(pc.list_flatten(interactions.column(name))).to_pylist():
                    titles.setdefault(it, None)
    missing = sum(t is None for t in titles.values())
    if missing:
        notes.append(f"{missing} of {len(titles)} items have no title: titled 'item <id>'")
    items = pa.table({"raw_item_id": pa.array(list(titles), pa.string()),
                      "title": pa.array(list(titles.values()), pa.string())}, schema=RAW_ITEMS_SCHEMA)
    return RawData(source="generic", interactions=interactions, items=items, bad_rows=bad,
                   files=[shown] + ([item_shown] if item_shown else []), notes=notes)
