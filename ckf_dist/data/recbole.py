"""RecBole atomic files, the ``recbole`` source (https://recbole.io/docs/user_guide/data/atomic_files.html).

``data.raw_path`` is a folder holding one data set: ``<name>.item`` (titles) and interactions in one of two
forms. Every file starts with a tab-separated header of ``field:type`` names; fields are matched by name
without the type (``user_id``, ``item_id``, ``rating``, ``timestamp``, ``title``; ``data.column_map`` renames:
keys user, item, rating, timestamp, title).

* History-list form (sequential benchmarks such as LLMRank's Games-6k): ``<name>.{train,valid,test}.inter``
  (any that exist) with ``user_id:token``, ``item_id_list:token_seq`` (space-separated history, oldest first)
  and ``item_id:token`` (the held-out next item). A user's sequence is the longest ``history + [target]`` of
  its lines; every other line of the user must be a prefix of it (else it is a bad row). The sequence is
  expanded into interactions with synthetic timestamps ``BASE_TIME + position * TIME_STEP`` (strictly
  increasing, so order is preserved). With ``data.test_per_user = 1`` (required) the time split then puts the
  ``test.inter`` target in test and the ``valid.inter`` target (the item before it) in valid, and a prompt's
  history holds only items strictly before its target: the target never leaks into its history.
* Plain form: ``<name>.inter`` with user and item columns and optional ``rating`` and ``timestamp``; without a
  timestamp column a user's rows get synthetic increasing timestamps in file order.

Titles: the ``.item`` file (``data.meta_path`` names it when the folder has several) with a ``title`` field (or
one ending in ``title``, e.g. ``movie_title``); without one items are titled ``"item <id>"`` (noted in the
manifest). Bad rows (wrong field count, empty ids, unknown item ids, bad ratings/timestamps, inconsistent
histories, duplicate item ids) are counted with ``file:line``.
"""
from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.fs as pafs

from ckf_dist.config import DataConfig
from ckf_dist.data.io import get_filesystem, join, read_text, text_lines
from ckf_dist.data.raw import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, BadRows, RawData

BASE_TIME = 1_000_000_000  # synthetic timestamps: BASE_TIME + position * TIME_STEP (seconds)
TIME_STEP = 60
SPLIT_FILES = ("train", "valid", "test")  # <name>.<split>.inter, read in this order


def _names(header: str) -> list[str]:
    """Field names of a header line without their ``:type`` suffix."""
    return [f.split(":", 1)[0].strip() for f in header.split("\t")]


def _header(fs, path: str) -> list[str]:
    """Field names of an atomic file's header line (reads only the start of the file)."""
    with fs.open_input_stream(path) as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace")
    return _names(head.split("\n", 1)[0].rstrip("\r"))


def _read_table(fs, path: str, shown: str) -> tuple[list[str], list[tuple[int, str]]]:
    """(field names, [(line number, line)]) of an atomic file; raises ValueError for an empty file."""
    lines = list(text_lines(read_text(fs, path, display=shown)))
    if not lines:
        raise ValueError(f"{shown}: empty file (expected a 'field:type' header line)")
    return _names(lines[0][1]), lines[1:]


def _column(names: list[str], wanted: str, shown: str, required: bool = True) -> int | None:
    if wanted in names:
        return names.index(wanted)
    if required:
        raise ValueError(f"{shown}: no {wanted!r} field in the header (fields: {names}; data.column_map renames)")
    return None


def _list_folder(fs, folder: str, shown: str) -> list[str]:
    info = fs.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"data.raw_path: folder not found: {shown}")
    return sorted(f.base_name for f in fs.get_file_info(pafs.FileSelector(folder)) if f.type == pafs.FileType.File)


def read_items(fs, path: str, shown: str, cmap: dict, bad: BadRows) -> dict[str, str | None]:
    """Item id -> title (None when the file has no title field) from a ``.item`` file."""
    names, rows = _read_table(fs, path, shown)
    id_col = _column(names, cmap.get("item", "item_id"), shown)
    title_name = cmap.get("title") or next((n for n in names if n == "title"), None) \
        or next((n for n in names if n.endswith("title")), None)
    title_col = _column(names, title_name, shown, required=bool(cmap.get("title"))) if title_name else None
    titles: dict[str, str | None] = {}
    for lineno, line in rows:
        parts = _split_row(line, len(names), shown, lineno, bad)
        if parts is None:
            continue
        item = parts[id_col].strip()
        if not item:
            bad.add(shown, lineno, "empty item id", line, kind="empty id")
            continue
        if item in titles:
            bad.add(shown, lineno, f"duplicate item id {item!r}", line, kind="duplicate item id")
            continue
        titles[item] = parts[title_col].strip() if title_col is not None else None
    return titles


def _history_form(fs, folder, shown_folder, files, cmap, known, bad) -> tuple[list[tuple], list[str]]:
    """Interactions of the history-list form; returns (rows, files read)."""
    item_name = cmap.get("item", "item_id")
    seqs: dict[str, list[str]] = {}
    read = []
    for fname in files:
        path, shown = join(folder, fname), join(shown_folder, fname)
        names, rows = _read_table(fs, path, shown)
        u_col = _column(names, cmap.get("user", "user_id"), shown)
        h_col = _column(names, f"{item_name}_list", shown)
        t_col = _column(names, item_name, shown)
        read.append(shown)
        for lineno, line in rows:
            parts = _split_row(line, len(names), shown, lineno, bad)
            if parts is None:
                continue
            user, target = parts[u_col].strip(), parts[t_col].strip()
            if not user or not target:
                bad.add(shown, lineno, "empty user id or target item id", line, kind="empty id")
                continue
            seq = parts[h_col].split() + [target]
            unknown = next((i for i in seq if i not in known), None) if known is not None else None
            if unknown is not None:
                bad.add(shown, lineno, f"item id {unknown!r} is not in the .item file", line, kind="unknown item id")
                continue
            old = seqs.get(user)
            if old is None or (len(seq) >= len(old) and seq[:len(old)] == old):
                seqs[user] = seq
            elif not (len(seq) < len(old) and old[:len(seq)] == seq):
                bad.add(shown, lineno, f"history of user {user!r} is not a prefix/extension of its sequence in an "
                        "earlier line (kept the earlier one)", line, kind="inconsistent history")
    out = [(u, item, None, BASE_TIME + k * TIME_STEP) for u, seq in seqs.items() for k, item in enumerate(seq)]
    return out, read


def _split_row(line: str, n_fields: int, shown: str, lineno: int, bad) -> list[str] | None:
    """The tab-separated fields of one atomic-file line, or None after reporting a wrong field count."""
    parts = line.split("\t")
    if len(parts) != n_fields:
        bad.add(shown, lineno, f"expected {n_fields} tab-separated fields, got {len(parts)}", line,
                kind="wrong field count")
        return None
    return parts


def _plain_form(fs, path, shown, cmap, known, bad) -> list[tuple]:
    """Interactions of a plain ``.inter`` file (user, item, optional rating and timestamp)."""
    names, rows = _read_table(fs, path, shown)
    u_col = _column(names, cmap.get("user", "user_id"), shown)
    i_col = _column(names, cmap.get("item", "item_id"), shown)
    r_col = _column(names, cmap.get("rating", "rating"), shown, required="rating" in cmap)
    t_col = _column(names, cmap.get("timestamp", "timestamp"), shown, required="timestamp" in cmap)
    out, position = [], {}
    for lineno, line in rows:
        parts = _split_row(line, len(names), shown, lineno, bad)
        if parts is None:
            continue
        user, item = parts[u_col].strip(), parts[i_col].strip()
        if not user or not item:
            bad.add(shown, lineno, "empty user or item id", line, kind="empty id")
            continue
        if known is not None and item not in known:
            bad.add(shown, lineno, f"item id {item!r} is not in the .item file", line, kind="unknown item id")
            continue
        rating = None
        if r_col is not None:
            try:
                rating = float(parts[r_col])
            except ValueError:
                rating = math.nan
            if not 1.0 <= rating <= 5.0:
                bad.add(shown, lineno, f"rating {parts[r_col]!r} is not a number in 1..5", line,
                        kind="rating outside 1-5")
                continue
        if t_col is not None:
            try:
                ts_f = float(parts[t_col])
            except ValueError:
                ts_f = math.nan
            if not (ts_f >= 0 and math.isfinite(ts_f)):
                bad.add(shown, lineno, f"timestamp {parts[t_col]!r} is not a non-negative number", line,
                        kind="bad timestamp")
                continue
            ts = int(ts_f)
        else:
            position[user] = position.get(user, -1) + 1
            ts = BASE_TIME + position[user] * TIME_STEP
        out.append((user, item, rating, ts))
    return out


def read(cfg: DataConfig) -> RawData:
    """The ``recbole`` source (see the module docstring)."""
    fs, folder = get_filesystem(cfg.raw_path, cfg.s3)
    names = _list_folder(fs, folder, cfg.raw_path)
    cmap = dict(cfg.column_map)
    bad, notes = BadRows(), []
    # the .item file
    if cfg.meta_path:
        mfs, item_path = get_filesystem(cfg.meta_path, cfg.s3)
        item_shown = cfg.meta_path
    else:
        item_files = [n for n in names if n.endswith(".item")]
        if len(item_files) > 1:
            raise ValueError(f"data.raw_path={cfg.raw_path} holds several .item files {item_files}: "
                             "name one with data.meta_path")
        mfs, item_path = fs, (join(folder, item_files[0]) if item_files else "")
        item_shown = join(cfg.raw_path, item_files[0]) if item_files else ""
    titles = read_items(mfs, item_path, item_shown, cmap, bad) if item_path else None
    # the interaction files
    inter = [n for n in names if n.endswith(".inter")]
    split_files = [n for s in SPLIT_FILES for n in inter if n.endswith(f".{s}.inter")]
    plain = [n for n in inter if n not in split_files]
    if split_files and f"{cmap.get('item', 'item_id')}_list" in _header(fs, join(folder, split_files[0])):
        if cfg.test_per_user != 1:
            raise ValueError(f"data.test_per_user={cfg.test_per_user}: the recbole history-list form holds out "
                             "exactly one valid and one test item per user; set data.test_per_user=1")
        rows, files = _history_form(fs, folder, cfg.raw_path, split_files, cmap, titles, bad)
        notes.append(f"recbole history lists expanded to interactions with synthetic timestamps "
                     f"{BASE_TIME} + position * {TIME_STEP}s (order preserved); split = the files' valid/test targets")
    else:
        if len(plain) != 1:
            raise ValueError(f"data.raw_path={cfg.raw_path}: expected one plain .inter file or "
                             f"<name>.{{train,valid,test}}.inter history lists, found {inter}")
        path, shown = join(folder, plain[0]), join(cfg.raw_path, plain[0])
        rows, files = _plain_form(fs, path, shown, cmap, titles, bad), [shown]
    if titles is None:
        notes.append("no .item file: items are titled 'item <id>'")
        titles = {item: None for item in dict.fromkeys(r[1] for r in rows)}
    elif all(t is None for t in titles.values()):
        notes.append(f"{item_shown} has no title field: items are titled 'item <id>'")
    cols = list(zip(*rows)) if rows else [()] * 4
    interactions = pa.table({
        "raw_user_id": pa.array(cols[0], pa.string()), "raw_item_id": pa.array(cols[1], pa.string()),
        "rating": pa.array(cols[2], pa.float32()), "timestamp": pa.array(cols[3], pa.int64()),
        "review": pa.nulls(len(rows), pa.string())}, schema=RAW_INTERACTIONS_SCHEMA)
    items = pa.table({"raw_item_id": pa.array(list(titles), pa.string()),
                      "title": pa.array(list(titles.values()), pa.string())}, schema=RAW_ITEMS_SCHEMA)
    return RawData(source="recbole", interactions=interactions, items=items, bad_rows=bad,
                   files=([item_shown] if item_shown else []) + files, notes=notes)
