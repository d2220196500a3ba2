"""Prepares a data set: raw source -> sharded parquet (``ckf_dist.data.schema``) in a local folder or on S3.

    python -m ckf_dist.data.prepare [--config FILE] [key=value ...] [--force]

Steps: read the source (``ckf_dist.data.raw.SOURCES``; malformed rows are counted and reported), assign
contiguous ids, split per user by time, flag cold users (``ckf_dist.data.canonical``), build the prompts
(``ckf_dist.data.prompts``), write the shards and finally ``_manifest.json``: a folder without the manifest is
incomplete and is rebuilt by the next run. An existing complete data set is left alone unless ``force``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import sys
import time
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.config import Config, ConfigError, S3Config, load_config, resolve_data_path
from ckf_dist.data.canonical import SPLIT_RULE, build_canonical
from ckf_dist.data.io import delete_if_exists, exists, get_filesystem, join, read_json, write_json
from ckf_dist.data.prompts import build_prompts
from ckf_dist.data.raw import read_source
from ckf_dist.data.schema import MANIFEST, SPLITS

FORMAT_VERSION = 1
DATA_DIRS = ("users", "items", "interactions", "prompts")  # the only things a rebuild deletes
SECRET_KEYS = ("access_key_id", "secret_access_key")


def data_config_snapshot(cfg: Config) -> dict:
    """``cfg.data`` as a plain dict for the manifest, with S3 credentials removed."""
    snap = dataclasses.asdict(cfg.data)
    snap["s3"] = {k: v for k, v in snap["s3"].items() if k not in SECRET_KEYS}
    return snap


def read_manifest(path: str, s3: Optional[S3Config] = None) -> Optional[dict]:
    """The manifest of a prepared data set, or None when there is none (an incomplete or absent data set)."""
    fs, base = get_filesystem(path, s3)
    manifest_path = join(base, MANIFEST)
    if not exists(fs, manifest_path):
        return None
    try:
        return read_json(fs, manifest_path)
    except ValueError:  # truncated / not JSON: treat as incomplete
        return None


def is_prepared(path: str, s3: Optional[S3Config] = None) -> bool:
    """True when ``path`` holds a complete data set of this format version (its manifest is present)."""
    manifest = read_manifest(path, s3)
    return bool(manifest) and manifest.get("format_version") == FORMAT_VERSION


def write_sharded(fs, folder: str, table: pa.Table, rows_per_shard: int) -> list[str]:
    """Writes ``folder/part-NNNNN.parquet`` shards of at most ``rows_per_shard`` rows (one empty shard for an
    empty table, so readers always find the schema); returns the file names."""
    if rows_per_shard < 1:
        raise ValueError(f"data.rows_per_shard={rows_per_shard} must be >= 1")
    fs.create_dir(folder, recursive=True)
    names = []
    for n, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        name = f"part-{n:05d}.parquet"
        pq.write_table(table.slice(start, rows_per_shard), join(folder, name), filesystem=fs)
        names.append(name)
    return names


class _Clock:
    """Prints ``[prepare] <stage>: <details> (<elapsed>s)`` lines."""

    def __init__(self, progress: Callable[[str], None]):
        self.progress, self.t0 = progress, time.perf_counter()

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def __call__(self, stage: str, details: str) -> None:
        self.progress(f"[prepare] {stage}: {details} ({self.elapsed():.2f}s)")


def _config_drift(manifest: dict, cfg: Config) -> list[str]:
    old = manifest.get("data_config", {})
    new = data_config_snapshot(cfg)
    skip = {"path", "prepare_if_missing", "s3"}
    return sorted(k for k in new if k not in skip and old.get(k) != new[k])


def prepare(cfg: Config, out_path: Optional[str] = None, force: bool = False,
            progress: Callable[[str], None] = print) -> dict:
    """Builds the data set at ``out_path`` (default ``resolve_data_path(cfg)``) and returns its manifest.

    A complete data set already there is returned as is unless ``force``; a partial one (no manifest) is
    rebuilt. Raises FileNotFoundError for a missing raw file and ValueError for unusable data or config.
    """
    root = out_path or resolve_data_path(cfg)
    fs, base = get_filesystem(root, cfg.data.s3)
    if not force:
        manifest = read_manifest(root, cfg.data.s3)
        if manifest and manifest.get("format_version") == FORMAT_VERSION:
            drift = _config_drift(manifest, cfg)
            progress(f"[prepare] {root} is already prepared (source {manifest.get('source')!r}, created "
                     f"{manifest.get('created_at')}); nothing to do (force=True / --force rebuilds)")
            if drift:
                progress(f"[prepare] warning: data config differs from the prepared set in {drift}; "
                         "pass --force to rebuild with the current config")
            return manifest

    clock = _Clock(progress)
    raw = read_source(cfg.data)
    clock(f"read {cfg.data.source}", f"{raw.interactions.num_rows} interactions, {raw.items.num_rows} items, "
          f"{raw.bad_rows.total} bad rows")
    for note in raw.notes:
        progress(f"[prepare] note: {note}")
    if raw.bad_rows.total:
        progress("[prepare] " + raw.bad_rows.summary())
    data = build_canonical(raw, cfg.data)
    split_counts = data.split_counts()
    clock("ids + time split", f"{data.num_users} users ({int(data.is_cold_user.sum())} cold), {data.num_items} items, "
          f"split {split_counts}")
    prompts = build_prompts(data, cfg.data, raw.has_ratings, raw.has_reviews, raw.source, progress)
    clock("prompts", ", ".join(f"{s} {sum(prompts.counts[s].values())}" for s in SPLITS) + " rows")

    for name in (MANIFEST,) + DATA_DIRS:  # manifest first (the set is incomplete from here); no stale shards
        delete_if_exists(fs, join(base, name))
    files = {
        "users": write_sharded(fs, join(base, "users"), data.users_table(), max(data.num_users, 1)),
        "items": write_sharded(fs, join(base, "items"), data.items_table(), max(data.num_items, 1)),
        "interactions": write_sharded(fs, join(base, "interactions"), data.interactions_table(), cfg.data.rows_per_shard),
    }
    for split in SPLITS:
        files[f"prompts/{split}"] = write_sharded(fs, join(base, "prompts", split), prompts.tables[split],
                                                  cfg.data.rows_per_shard)
    clock("write", f"{sum(len(v) for v in files.values())} parquet files to {root}")

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": raw.source,
        "source_files": raw.files,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "num_users": data.num_users,
        "num_items": data.num_items,
        "num_interactions": data.num_interactions,
        "num_cold_users": int(data.is_cold_user.sum()),
        "num_items_fallback_title": data.num_fallback_titles,
        "source_notes": list(raw.notes),
        "interactions_per_split": split_counts,
        "prompts": prompts.counts,
        "prompt_rows_per_split": {s: sum(prompts.counts[s].values()) for s in SPLITS},
        "tasks": [t for t in cfg.data.tasks if t not in prompts.skipped_tasks],
        "skipped_tasks": prompts.skipped_tasks,
        "ctr_positive_fraction": prompts.ctr_positive_fraction,
        "max_prompt_chars": prompts.max_prompt_chars,
        "bad_rows": raw.bad_rows.to_dict(),
        "split_rule": SPLIT_RULE,
        "files": files,
        "data_config": data_config_snapshot(cfg),
        "prepare_seconds": clock.elapsed(),
    }
    write_json(fs, join(base, MANIFEST), manifest)  # last: marks the data set complete
    clock("done", f"manifest written to {join(root, MANIFEST)}")
    return manifest


SUMMARY = ("Prepares a data set: reads data.source (synthetic, MovieLens, Amazon reviews, RecBole, generic CSV/parquet "
           "from data.raw_path), splits each user's interactions by time, builds the prompt rows of every task in "
           "text-only and hybrid form, and writes parquet shards plus _manifest.json (last) to data.path (a local "
           "folder or s3://). A complete data set is left alone unless --force.")
OPTIONS = (("--force", "prepare again even when data.path already holds a complete data set"),)


def parse_args(argv: list[str]) -> tuple[Config, bool]:
    """(config, force) from the command line, without preparing anything. Raises ConfigError."""
    return load_config([a for a in argv if a != "--force"]), "--force" in argv


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point (``ckf-prepare`` / ``python -m ckf_dist.data.prepare``)."""
    from ckf_dist.config import cli_help, show_help, wants_help

    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        return show_help(cli_help("python -m ckf_dist.data.prepare", SUMMARY, OPTIONS))
    try:
        cfg, force = parse_args(args)
        prepare(cfg, force=force)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
