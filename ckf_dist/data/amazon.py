"""Amazon review data (McAuley et al.), the ``amazon-reviews`` source: 5-core review files as JSON lines.

Both releases are read:

* 2014: ``reviewerID, asin, reviewerName, helpful, reviewText, overall, summary, unixReviewTime, reviewTime``;
* 2018: the same core fields plus ``vote``, ``style``, ``verified``, ``image`` (ignored).

``data.raw_path`` is the review file (``.json``, ``.jsonl``, ``.gz``, or a ``.zip`` holding one file) or a
folder with exactly one such file (``meta_*`` files excluded). Each line becomes one interaction: user
``reviewerID``, item ``asin``, rating ``overall`` (1..5), timestamp ``unixReviewTime`` and review text
``reviewText`` (``summary`` when the text is empty). Reviews feed the explanation task (answer: one sentence of
the review, see ``raw.review_sentence``) and the review_rating variant.

Titles: ``data.meta_path`` may name a metadata file (2014 ``meta_*.json``, one Python-literal dict per line, or
2018 strict JSON; plain, ``.gz`` or ``.zip``) with ``asin`` and ``title``. The catalogue is the set of reviewed
items; an item without a title (no metadata file, or no title in it) is called ``"item <asin>"``, and the
manifest says so (``source_notes``, ``num_items_fallback_title``). Metadata lines of items nobody reviewed are
not parsed.

Malformed review lines are counted in the bad-row report with ``file:line`` and skipped: empty line, bad
JSON, not an object, missing field, empty id, rating not a number in 1..5, bad timestamp, and a repeated
(reviewerID, asin) pair (the first one in file order is kept).
"""
from __future__ import annotations

import ast
import html
import json
import re

import pyarrow as pa

from ckf_dist.config import DataConfig
from ckf_dist.data.io import decompressed_text, get_filesystem, join, read_bytes, text_lines
from ckf_dist.data.raw import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, BadRows, RawData

REQUIRED = ("reviewerID", "asin", "overall", "unixReviewTime")
REVIEW_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".gz", ".zip")
_ASIN_RE = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")


def find_review_file(fs, path: str, display: str) -> tuple[str, str]:
    """(path in fs, display name) of the review file: ``path`` itself when it is a file, else the single
    review-like file in the folder. Raises FileNotFoundError / ValueError naming the folder."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.raw_path: file or folder not found: {display}")
    if info.type == pafs.FileType.File:
        return path, display
    found = sorted(f.base_name for f in fs.get_file_info(pafs.FileSelector(path))
                   if f.type == pafs.FileType.File and f.base_name.lower().endswith(REVIEW_SUFFIXES)
                   and not f.base_name.startswith("meta_"))
    if len(found) != 1:
        raise ValueError(f"data.raw_path={display}: expected exactly one review file ({', '.join(REVIEW_SUFFIXES)}, "
                         f"not meta_*) in the folder, found {found}; name the file itself")
    return join(path, found[0]), join(display, found[0])


def _text(value) -> str | None:
    """A non-blank string field, else None."""
    return value if isinstance(value, str) and value.strip() else None



def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_review(line: str) -> tuple[tuple | None, str, str]:
    """One review line -> ((user, item, rating, timestamp, review), "", "") or (None, reason, counting kind)."""
    if not line.strip():
        return None, "empty line", "empty line"
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return None, f"bad JSON ({exc})", "bad JSON"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}", "not a JSON object"
    for key in REQUIRED:
        if obj.get(key) is None:
            return None, f"missing field {key!r}", "missing field"
    user, item = obj["reviewerID"], obj["asin"]
    if not (isinstance(user, str) and user.strip() and isinstance(item, str) and item.strip()):
        return None, f"reviewerID {user!r} / asin {item!r} must be non-empty strings", "empty id"
    rating = obj["overall"]
    if isinstance(rating, str):
        # "4.0" as a string is accepted; any other string stays a str and is reported just below.
        rating = float(rating) if _is_float(rating) else rating
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not 1.0 <= rating <= 5.0:
        return None, f"overall {obj['overall']!r} is not a number in 1..5", "rating outside 1-5"
    ts = obj["unixReviewTime"]
    if isinstance(ts, str) and ts.strip().isdigit():
        ts = int(ts)
    if isinstance(ts, float) and ts.is_integer():
        ts = int(ts)
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        return None, f"unixReviewTime {obj['unixReviewTime']!r} is not a non-negative integer", "bad timestamp"
    review = _text(obj.get("reviewText")) or _text(obj.get("summary"))
    return (user.strip(), item.strip(), float(rating), ts, review), "", ""


def read_reviews(text: str, file: str, bad: BadRows) -> pa.Table:
    """The interactions of a review file's text (RAW_INTERACTIONS_SCHEMA)."""
    rows, seen = [], set()
    for lineno, line in text_lines(text):
        parsed, reason, kind = parse_review(line)
        if parsed is None:
            bad.add(file, lineno, reason, line, kind=kind)
            continue
        key = parsed[:2]
        if key in seen:
            bad.add(file, lineno, f"repeated review of {key[1]!r} by {key[0]!r} (the first is kept)", line,
                    kind="duplicate (reviewerID, asin)")
            continue
        seen.add(key)
        rows.append(parsed)
    cols = list(zip(*rows)) if rows else [()] * 5
    return pa.table({
        "raw_user_id": pa.array(cols[0], pa.string()), "raw_item_id": pa.array(cols[1], pa.string()),
        "rating": pa.array(cols[2], pa.float32()), "timestamp": pa.array(cols[3], pa.int64()),
        "review": pa.array(cols[4], pa.string())}, schema=RAW_INTERACTIONS_SCHEMA)


def _parse_meta_line(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return ast.literal_eval(line)  # the 2014 metadata files are Python literals (single quotes)


def read_meta(text: str, file: str, wanted: set[str], bad: BadRows) -> dict[str, str]:
    """asin -> title for the ``wanted`` asins, from a metadata file's text. Lines of other asins are skipped
    unparsed; a wanted line that does not parse (JSON or Python literal) is a bad row."""
    titles: dict[str, str] = {}
    for lineno, line in text_lines(text):
        if not line.strip():
            continue
        match = _ASIN_RE.search(line)
        if match and match.group(1) not in wanted:
            continue
        try:
            obj = _parse_meta_line(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            bad.add(file, lineno, f"metadata line does not parse ({type(exc).__name__})", line, kind="bad metadata line")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("asin"), str):
            bad.add(file, lineno, "metadata line without an 'asin' string", line, kind="bad metadata line")
            continue
        asin, title = obj["asin"].strip(), _text(obj.get("title"))
        if asin in wanted and title and asin not in titles:
            titles[asin] = html.unescape(title)
    return titles


def read(cfg: DataConfig) -> RawData:
    """The ``amazon-reviews`` source (see the module docstring)."""
    fs, base = get_filesystem(cfg.raw_path, cfg.s3)
    path, shown = find_review_file(fs, base, cfg.raw_path)
    bad = BadRows()
    text, shown = decompressed_text(read_bytes(fs, path, shown), shown)
    interactions = read_reviews(text, shown, bad)
    del text
    asins = sorted(set(interactions.column("raw_item_id").to_pylist()))
    files, notes = [shown], []
    titles: dict[str, str] = {}
    if cfg.meta_path:
        mfs, mpath = get_filesystem(cfg.meta_path, cfg.s3)
        meta_text, meta_shown = decompressed_text(read_bytes(mfs, mpath, cfg.meta_path), cfg.meta_path)
        titles = read_meta(meta_text, meta_shown, set(asins), bad)
        files.append(meta_shown)
        missing = len(asins) - len(titles)
        if missing:
            notes.append(f"{missing} of {len(asins)} items have no title in {meta_shown}: titled 'item <asin>'")
    else:
        notes.append(f"no metadata file (data.meta_path): the {len(asins)} items are titled 'item <asin>'")
    items = pa.table({"raw_item_id": pa.array(asins, pa.string()),
                      "title": pa.array([titles.get(a) for a in asins], pa.string())}, schema=RAW_ITEMS_SCHEMA)
    return RawData(source="amazon-reviews", interactions=interactions, items=items, bad_rows=bad, files=files,
                   notes=notes)
