"""Checks a prepared data set's parquet shards before a job uses them: every shard's footer is readable and its
schema holds the columns of ``ckf_dist.data.schema`` with their types.

Only the footers are read (``pyarrow.parquet.read_metadata``: a size query and one ranged read of the file's
tail per shard, a few KiB on S3), so the check costs seconds even for thousands of shards. The training driver
runs it before it writes anything or starts a worker: a truncated or foreign shard found by a Ray Train worker
mid-epoch would fail that worker, Ray Train would restart it ``ray.max_failures`` times on the same bad file,
and checkpoints, CF versions and metrics would have been written for nothing.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.data import io
from ckf_dist.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, PROMPTS_SCHEMA, SPLITS, USERS_SCHEMA

# folder of the data set -> the schema its shards must carry (every reader of the set uses these folders)
FOLDER_SCHEMAS = {"users": USERS_SCHEMA, "items": ITEMS_SCHEMA, "interactions": INTERACTIONS_SCHEMA,
                  **{f"prompts/{s}": PROMPTS_SCHEMA for s in SPLITS}}


class DataSetError(ValueError):
    """A shard of a prepared data set that no job can use; the message names the file (and the column)."""


def shard_problem(fs, path: str, want: pa.Schema) -> Optional[str]:
    """None when ``path`` is a readable parquet file whose schema has every field of ``want`` with its type,
    else what is wrong with it (one line)."""
    try:
        schema = pq.read_metadata(path, filesystem=fs).schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:  # truncated / not parquet: "magic bytes not found in footer"
        return f"not a readable parquet file ({str(exc).splitlines()[0]})"
    for field in want:
        if field.name not in schema.names:
            return f"column {field.name!r} missing (it has {', '.join(schema.names)})"
        got = schema.field(field.name).type
        if got != field.type:
            return f"column {field.name!r} has type {got}, expected {field.type}"
    return None


def check_data_set(root: str, manifest: dict, s3=None, threads: int = 16) -> int:
    """Checks every shard of the prepared data set at ``root`` (local folder or ``s3://`` URI): the shards the
    manifest lists must exist, and every ``*.parquet`` file in its folders (what the readers read: Ray Data
    reads whole folders) must pass ``shard_problem``. Returns the number of shards checked; raises
    ``DataSetError`` naming every bad file (up to 10) otherwise."""
    fs, base = io.get_filesystem(root, s3)
    listed = manifest.get("files") or {}
    problems: list[str] = []
    jobs: list[tuple[str, str, pa.Schema]] = []
    for folder, schema in FOLDER_SCHEMAS.items():
        path = io.join(base, folder)
        present = io.list_files(fs, path, ".parquet") if io.exists(fs, path) else []
        names = {p.rsplit("/", 1)[-1] for p in present}
        for name in listed.get(folder, []):
            if name not in names:
                problems.append(f"{io.join(root, folder, name)}: listed in the manifest but missing")
        jobs += [(p, io.join(root, folder, p.rsplit("/", 1)[-1]), schema) for p in present]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
        found = pool.map(lambda job: (job[1], shard_problem(fs, job[0], job[2])), jobs)
        problems += [f"{shown}: {why}" for shown, why in found if why]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataSetError(f"the prepared data set at {root} has {len(problems)} unusable shard(s){more}; "
                           "re-run python -m ckf_dist.data.prepare --force or restore them:\n  "
                           + "\n  ".join(problems[:10]))
    return len(jobs)
