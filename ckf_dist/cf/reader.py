"""Reads the interaction shards of a prepared data set (``<root>/interactions/*.parquet``, INTERACTIONS_SCHEMA)
into numpy arrays for CF training, from a local folder or ``s3://``.

Two engines give identical results:

* ``ray`` (default, what the refresh job uses): ``ray.data.read_parquet(..., filesystem=fs)``; scales to
  many shards read in parallel on a cluster. Ray is started locally (light: no dashboard) when it is not
  initialised yet; under ``ray job submit`` it connects to the job's cluster (RAY_ADDRESS).
* ``arrow``: ``pyarrow.dataset`` directly, no Ray; used by unit tests and small sets where starting Ray
  (a few seconds) would dominate.

Nothing is dropped silently: rows with a null or negative id, an id outside the data set's declared
range, or an unknown split are counted per reason in ``Interactions.stats["malformed"]``, excluded, and
reported through ``progress``.

The id maps (raw id of each data-set id, from ``users/`` and ``items/``; the identity for an interactions-only
folder) and the data-set binding (``ckf_dist.cf.binding``) come with the interactions, read between two reads
of ``_manifest.json``: a data set re-prepared while it is read raises instead of binding a mix of two.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ckf_dist.cf.binding import make_binding
from ckf_dist.config import S3Config
from ckf_dist.data import io
from ckf_dist.data.schema import INTERACTIONS_SCHEMA, MANIFEST, SPLITS

COLUMNS = ["user_id", "item_id", "rating", "timestamp", "split"]
SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}  # train 0, valid 1, test 2


@dataclass
class Interactions:
    """Column arrays over the well-formed rows, all of length E.

    users, items: int64 [E] contiguous data-set ids; ratings: float32 [E] (NaN where null);
    timestamps: int64 [E]; split: int8 [E] (0 train, 1 valid, 2 test).
    num_users / num_items: the id ranges (declared by the data set's manifest, else max id + 1).
    user_raw_ids / item_raw_ids: str [num_users] / [num_items], the raw (source) id of each data-set id; None
    when unknown (an ``Interactions`` built by hand). binding: ``make_binding`` of the data set (may be empty).
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    split: np.ndarray
    num_users: int
    num_items: int
    stats: dict = field(default_factory=dict)
    snapshot: dict = field(default_factory=dict)
    user_raw_ids: Optional[np.ndarray] = None
    item_raw_ids: Optional[np.ndarray] = None
    binding: dict = field(default_factory=dict)

    def select(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users [n], items [n], ratings [n]) of one split."""
        m = self.split == SPLIT_CODE[split]
        return self.users[m], self.items[m], self.ratings[m]


def ensure_ray(address: str = "", num_cpus: int = 0) -> None:
    """Initialises Ray if needed: connects to ``address`` / RAY_ADDRESS, else starts a small local instance."""
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local": always a new local instance, never a cluster that happens to run on this machine.
        ray.init(address="local", num_cpus=num_cpus or None, **kwargs)


def _read_table_ray(path: str, fs: pafs.FileSystem) -> pa.Table:
    import ray

    ds = ray.data.read_parquet(path, filesystem=fs, columns=COLUMNS)
    refs = ds.to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return INTERACTIONS_SCHEMA.empty_table().select(COLUMNS)
    return pa.concat_tables(tables, promote_options="permissive")


def _read_table_arrow(path: str, fs: pafs.FileSystem) -> pa.Table:
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=COLUMNS)


def _manifest_bytes(fs: pafs.FileSystem, root: str) -> Optional[bytes]:
    """The bytes of ``<root>/_manifest.json``, None when there is none."""
    path = io.join(root, MANIFEST)
    if not io.exists(fs, path):
        return None
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:  # removed in between (a prepare started)
        return None


def _declared_counts(raw: Optional[bytes], path: str) -> tuple[Optional[int], Optional[int], Optional[dict]]:
    """(num_users, num_items, manifest dict) from the bytes of the data set's ``_manifest.json`` when present."""
    if raw is None:
        return None, None, None
    try:
        man = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise ValueError(f"data set manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(man, dict):
        raise ValueError(f"data set manifest {path} is not a JSON object")
    counts = man.get("counts", man)
    nu = counts.get("num_users", man.get("num_users"))
    ni = counts.get("num_items", man.get("num_items"))
    return int(nu) if nu is not None else None, int(ni) if ni is not None else None, man


def _id_map(fs: pafs.FileSystem, root: str, data_root: str, table: str, n: int) -> Optional[np.ndarray]:
    """str [n]: raw id of each data-set id from ``<root>/<table>/`` (users | items), None when absent.

    Raises ValueError naming the folder when the ids are not exactly 0..n-1 or a raw id is null or repeated.
    """
    folder = io.join(root, table)
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return None
    key = table[:-1]  # user | item
    t = pads.dataset(folder, filesystem=fs, format="parquet").to_table(columns=[f"{key}_id", f"raw_{key}_id"])
    where = f"{io.join(data_root, table)}"
    if t.column(f"{key}_id").null_count or t.column(f"raw_{key}_id").null_count:
        raise ValueError(f"{where}: null {key}_id or raw_{key}_id")
    ids = t.column(f"{key}_id").to_numpy(zero_copy_only=False).astype(np.int64)
    raw = np.asarray(t.column(f"raw_{key}_id").to_pylist(), dtype=str)
    if len(ids) != n or not np.array_equal(np.sort(ids), np.arange(n)):
        raise ValueError(f"{where}: {key}_id must be exactly 0..{n - 1} once each (the data set's id range), "
                         f"found {len(ids)} rows with ids {ids.min() if len(ids) else None}..{ids.max() if len(ids) else None}")
    if len(np.unique(raw)) != n:
        raise ValueError(f"{where}: raw_{key}_id has duplicates")
    out = np.empty(n, dtype=raw.dtype)
    out[ids] = raw
    return out


def read_interactions(data_root: str, *, s3: Optional[S3Config] = None, engine: str = "ray",
                      ray_address: str = "", ray_num_cpus: int = 0,
                      progress: Callable[[str], None] = print) -> Interactions:
    """Reads ``<data_root>/interactions/`` (local or s3://) into an ``Interactions``.

    Raises FileNotFoundError naming the folder when there are no shards, ValueError when a required
    column is missing or no well-formed training row remains.
    """
    fs, root = io.get_filesystem(data_root, s3)
    inter = io.join(root, "interactions")
    infos = [i for i in fs.get_file_info(pafs.FileSelector(inter, allow_not_found=True, recursive=True))
             if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    if not infos:
        raise FileNotFoundError(f"no interaction shards (*.parquet) under {io.join(data_root, 'interactions')}")
    infos.sort(key=lambda i: i.path)
    manifest_raw = _manifest_bytes(fs, root)  # read again at the end: a re-prepare in between raises
    if engine == "ray":
        ensure_ray(ray_address, ray_num_cpus)
        table = _read_table_ray(inter, fs)
    elif engine == "arrow":
        table = _read_table_arrow(inter, fs)
    else:
        raise ValueError(f"unknown reader engine {engine!r} (ray | arrow)")
    missing = [c for c in ("user_id", "item_id", "split") if c not in table.column_names]
    if missing:
        raise ValueError(f"interaction shards under {data_root}/interactions lack column(s) {missing}")

    n_read = table.num_rows
    null_id = (pc.is_null(table["user_id"]).to_numpy(zero_copy_only=False)
               | pc.is_null(table["item_id"]).to_numpy(zero_copy_only=False))
    users = pc.fill_null(table["user_id"].cast(pa.int64()), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    items = pc.fill_null(table["item_id"].cast(pa.int64()), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    split_str = pc.fill_null(table["split"].cast(pa.string()), "").to_numpy(zero_copy_only=False)
    split = np.full(n_read, -1, dtype=np.int8)
    for name, code in SPLIT_CODE.items():
        split[split_str == name] = code
    ratings = (table["rating"].cast(pa.float32()).fill_null(np.nan).to_numpy(zero_copy_only=False)
               if "rating" in table.column_names else np.full(n_read, np.nan, np.float32)).astype(np.float32)
    ts = (table["timestamp"].cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
          if "timestamp" in table.column_names else np.zeros(n_read, np.int64)).astype(np.int64)

    declared_users, declared_items, manifest = _declared_counts(manifest_raw, io.join(data_root, MANIFEST))
    manifest_sha = hashlib.sha256(manifest_raw).hexdigest() if manifest_raw is not None else None
    bad = {
        "null_id": null_id,
        "negative_id": ~null_id & ((users < 0) | (items < 0)),
        "unknown_split": split < 0,
    }
    if declared_users is not None:
        bad["user_id_out_of_range"] = users >= declared_users
    if declared_items is not None:
        bad["item_id_out_of_range"] = items >= declared_items
    drop = np.zeros(n_read, dtype=bool)
    malformed = {}
    for reason, mask in bad.items():
        new = mask & ~drop  # each dropped row is counted once, under its first reason
        malformed[reason] = int(new.sum())
        drop |= mask
    keep = ~drop
    users, items, ratings, ts, split = users[keep], items[keep], ratings[keep], ts[keep], split[keep]
    if malformed and sum(malformed.values()):
        progress(f"[cf.reader] {data_root}: excluded {int(drop.sum())} of {n_read} rows: "
                 + ", ".join(f"{k}={v}" for k, v in malformed.items() if v))
    if not (split == SPLIT_CODE["train"]).any():
        raise ValueError(f"no well-formed train-split interactions under {data_root}/interactions "
                         f"({n_read} rows read, malformed: {malformed})")
    num_users = declared_users if declared_users is not None else int(users.max()) + 1
    num_items = declared_items if declared_items is not None else int(items.max()) + 1
    per_split = {name: int((split == code).sum()) for name, code in SPLIT_CODE.items()}
    stats = {"rows_read": n_read, "rows_used": int(keep.sum()), "malformed": malformed, "per_split": per_split,
             "engine": engine}
    listing = "\n".join(f"{i.path[len(root):]}:{i.size}" for i in infos)
    snapshot = {
        "path": data_root,
        "num_files": len(infos),
        "num_rows": n_read,
        "files_sha256": hashlib.sha256(listing.encode()).hexdigest(),  # names + sizes of the shards
        "dataset_manifest_sha256": manifest_sha,
        "max_timestamp": int(ts.max()) if ts.size else None,
    }
    user_raw = _id_map(fs, root, data_root, "users", num_users)
    item_raw = _id_map(fs, root, data_root, "items", num_items)
    source = {"users": "users/raw_user_id" if user_raw is not None else "identity (no users/ table)",
              "items": "items/raw_item_id" if item_raw is not None else "identity (no items/ table)"}
    user_raw = user_raw if user_raw is not None else np.arange(num_users).astype(str)
    item_raw = item_raw if item_raw is not None else np.arange(num_items).astype(str)
    if _manifest_bytes(fs, root) != manifest_raw:
        raise ValueError(f"the data set at {data_root} changed while it was read ({MANIFEST} was rewritten or "
                         "removed: a prepare ran meanwhile); read it again once the prepare has finished")
    binding = make_binding(data_root, manifest, user_raw, item_raw, id_maps_source=f"{source['users']}, "
                           f"{source['items']}", files_sha256=snapshot["files_sha256"])
    return Interactions(users, items, ratings, ts, split, num_users, num_items, stats, snapshot,
                        user_raw, item_raw, binding)
