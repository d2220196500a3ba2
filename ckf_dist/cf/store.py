"""Versioned CF embedding store on a local folder or ``s3://bucket/prefix``.

Layout under ``root``::

    root/latest                              pointer, JSON {"version": id, "manifest_sha256": ...}; moved LAST
    root/versions/<id>/user_table.npy        float32 [n_user_rows, d]   row k is the user user_ids[k]
    root/versions/<id>/item_table.npy        float32 [n_item_rows, d]
    root/versions/<id>/user_ids.npy          int64 [n_user_rows]        data-set user_id of each row
    root/versions/<id>/item_ids.npy          int64 [n_item_rows]
    root/versions/<id>/user_raw_ids.npy      str [n_user_rows]   raw (source) user id of each row; with item_raw_ids.npy
    root/versions/<id>/item_raw_ids.npy      str [n_item_rows]   present exactly when the version has a binding
    root/versions/<id>/manifest.json         written after the tables: its presence marks the version complete
    root/.publish.lock                       (local only) flock serialising pointer moves and clean-up

Version ids sort by creation time: ``v20261123T101500.123456Z-3fa9c1`` (UTC, microseconds, random suffix).

A version published by the refresh job carries a **binding** to the prepared data set it was trained on:
``manifest["binding"]`` (the data manifest's hash, a hash of the data set's id maps, a summary for error
messages; see ``ckf_dist.cf.binding``) plus the raw id of every row (``*_raw_ids.npy``, checksummed like the
tables). Versions without one (older ones, hand-published ones) are *unbound*: ``ckf_dist.cf.binding`` refuses
them for use with a data set.

Guarantees
----------
* A reader only ever sees complete versions: tables are written first, the manifest (with a sha256 per
  file) after them, the ``latest`` pointer last. Locally the manifest and pointer are written to a temp
  file and ``os.replace``-d (atomic rename); on S3 each is one PUT, which S3 makes visible atomically
  (there is no rename on S3). A publish that crashes leaves a version folder without a manifest: it is
  invisible to ``list_versions``/``latest_version`` and is deleted by a later publish once stale (1 h).
* ``load_version`` verifies every file against the manifest (presence, sha256, dtype, shape) and raises
  ``CorruptVersionError`` naming the version and the fault; loading ``latest`` also checks the manifest
  against the pointer's hash, so a mix of two versions can never load.
* Concurrent publishers never collide: each writes its own uniquely named folder. The pointer only moves
  forward (to a larger id). On a local/POSIX filesystem the read-compare-write of the pointer and the
  clean-up run under an exclusive ``flock``, so the pointer always ends on the newest complete version.
  On S3 there is no lock: two publishers finishing within the same moment can both write the pointer and
  the last PUT wins; the pointer still names a complete, verified version (never a torn one), but it may
  name the older of the two until the next publish. Each publisher re-reads the pointer after writing
  and re-asserts a newer id once, which narrows that window to a few milliseconds. Run one refresh
  schedule per root for strict ordering on S3 (cluster/: the CronJob uses ``concurrencyPolicy: Forbid``,
  the RayCronJob an ``activeDeadlineSeconds`` shorter than its interval).
* Clean-up keeps the newest ``keep`` complete versions and never deletes the version the pointer names.
  A trainer that pinned an older version (e.g. in a checkpoint) can load it until it falls out of the
  ``keep`` window; past that, ``load_version`` raises FileNotFoundError naming it and what is available.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io as _io
import json
import math
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pyarrow.fs as pafs

from ckf_dist.config import S3Config
from ckf_dist.data import io

FORMAT = "ckf-cf-embeddings/1"
POINTER = "latest"
VERSIONS = "versions"
MANIFEST_FILE = "manifest.json"
FILES = {"user_table": "user_table.npy", "item_table": "item_table.npy",
         "user_ids": "user_ids.npy", "item_ids": "item_ids.npy"}
RAW_ID_FILES = {"user_raw_ids": "user_raw_ids.npy", "item_raw_ids": "item_raw_ids.npy"}  # bound versions only
STALE_INCOMPLETE_S = 3600.0


class CorruptVersionError(ValueError):
    """A published version that fails verification; the message names the version and the fault."""


@dataclass
class EmbeddingVersion:
    """One loaded, verified version.

    user_table: float32 [n_user_rows, d], row k = data-set user ``user_ids[k]``; item_table likewise.
    manifest: the version's manifest dict (model_type, dim, metrics, data_snapshot, files, binding, ...).
    user_raw_ids / item_raw_ids: str [n_*_rows], the raw (source) id of each row; None for an unbound version.
    """

    version: str
    user_table: np.ndarray
    item_table: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    manifest: dict
    user_raw_ids: Optional[np.ndarray] = None
    item_raw_ids: Optional[np.ndarray] = None

    @property
    def dim(self) -> int:
        return int(self.user_table.shape[1])

    @property
    def binding(self) -> Optional[dict]:
        """The data-set binding recorded at publish time, or None (an unbound version)."""
        b = self.manifest.get("binding")
        return b if isinstance(b, dict) and self.user_raw_ids is not None and self.item_raw_ids is not None else None

    def dense_tables(self, num_users: Optional[int] = None, num_items: Optional[int] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Tables laid out by data-set id: (users [U+1, d], items [I+1, d]) float32.

        Row id holds the embedding of that id; the LAST row (index U, resp. I) is the fallback vector,
        the mean of the version's trained rows, which also fills every id the version does not cover (new
        users/items, ids absent from the id map). U defaults to the data set's id range recorded at
        publish time (data_snapshot.num_users), else max id + 1. Ids in the map >= U are not placed.
        """
        return (_dense(self.user_table, self.user_ids, num_users, self.manifest, "num_users"),
                _dense(self.item_table, self.item_ids, num_items, self.manifest, "num_items"))


def _dense(table: np.ndarray, ids: np.ndarray, n: Optional[int], manifest: dict, key: str) -> np.ndarray:
    if n is None:
        n = (manifest.get("data_snapshot") or {}).get(key)
        n = int(n) if n is not None else (int(ids.max()) + 1 if ids.size else 0)
    fallback = table.mean(axis=0) if len(table) else np.zeros(table.shape[1], np.float32)
    out = np.empty((n + 1, table.shape[1]), dtype=np.float32)
    out[:] = fallback
    m = ids < n
    out[ids[m]] = table[m]
    return out


# ----------------------------------------------------------------------------------------------- helpers
def new_version_id() -> str:
    now = dt.datetime.now(dt.timezone.utc)
    return f"v{now:%Y%m%dT%H%M%S}.{now.microsecond:06d}Z-{secrets.token_hex(3)}"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON: NaN/inf become null
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Local: temp file + rename (atomic on POSIX). S3: one PUT (atomic visibility)."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        io.write_bytes(fs, tmp, data)
        os.replace(tmp, path)
    else:
        io.write_bytes(fs, path, data)


@contextlib.contextmanager
def _publish_lock(fs: pafs.FileSystem, root: str):
    """Exclusive flock on <root>/.publish.lock for local roots; no-op on S3 (see module docstring)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        yield
        return
    import fcntl

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".publish.lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_pointer(fs: pafs.FileSystem, path: str, root_uri: str) -> Optional[dict]:
    try:
        raw = _read_bytes(fs, io.join(path, POINTER))
    except FileNotFoundError:
        return None
    try:
        ptr = json.loads(raw.decode("utf-8"))
        if not isinstance(ptr, dict) or not isinstance(ptr.get("version"), str):
            raise ValueError("no 'version' string")
    except ValueError as exc:
        raise CorruptVersionError(f"embedding store {root_uri}: pointer {POINTER!r} is unreadable: {exc}") from exc
    return ptr


def _id_time(version: str) -> Optional[dt.datetime]:
    try:
        return dt.datetime.strptime(version[1:].split("Z", 1)[0], "%Y%m%dT%H%M%S.%f").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def _scan(fs: pafs.FileSystem, path: str) -> tuple[list[str], list[str]]:
    """(complete versions, incomplete version folders), each sorted ascending."""
    vroot = io.join(path, VERSIONS)
    infos = fs.get_file_info(pafs.FileSelector(vroot, allow_not_found=True, recursive=True))
    folders, complete = set(), set()
    for info in infos:
        rel = info.path[len(vroot):].strip("/")
        parts = rel.split("/")
        if not parts[0]:
            continue
        folders.add(parts[0])
        if len(parts) == 2 and parts[1] == MANIFEST_FILE and info.type == pafs.FileType.File:
            complete.add(parts[0])
    return sorted(complete), sorted(folders - complete)


# ----------------------------------------------------------------------------------------------- public API
def list_versions(root: str, s3: Optional[S3Config] = None) -> list[str]:
    """Complete versions under ``root``, oldest first (incomplete/crashed publishes are not listed)."""
    fs, path = io.get_filesystem(root, s3)
    return _scan(fs, path)[0]


def latest_version(root: str, s3: Optional[S3Config] = None) -> Optional[str]:
    """The version the ``latest`` pointer names, or None when nothing was published yet."""
    fs, path = io.get_filesystem(root, s3)
    ptr = _read_pointer(fs, path, root)
    return ptr["version"] if ptr else None


def _raw_id_array(name: str, raw, n_rows: int) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.dtype.kind not in "UO" or arr.ndim != 1 or len(arr) != n_rows:
        raise ValueError(f"{name} has shape {arr.shape} dtype {arr.dtype}, expected [{n_rows}] strings "
                         f"(the raw id of each table row)")
    arr = arr.astype(str)
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"{name} must be unique (one raw id per row)")
    return arr


def publish_version(root: str, user_table: np.ndarray, item_table: np.ndarray, *, user_ids: np.ndarray,
                    item_ids: np.ndarray, model_type: str, metrics: dict, data_snapshot: dict, keep: int = 5,
                    s3: Optional[S3Config] = None, progress: Callable[[str], None] = lambda _m: None,
                    user_raw_ids=None, item_raw_ids=None, binding: Optional[dict] = None) -> str:
    """Writes a new version (tables, id maps, manifest), then moves ``latest`` to it; returns its id.

    user_table [n_user_rows, d] with user_ids [n_user_rows] (data-set ids, unique); items likewise.
    binding (``ckf_dist.cf.binding.make_binding``) with user_raw_ids [n_user_rows] / item_raw_ids [n_item_rows]
    (str, unique): the data set the version was trained on; all three or none (an unbound version).
    Afterwards deletes complete versions beyond the newest ``keep`` (never the pointer's target) and
    stale incomplete folders. See the module docstring for the concurrency guarantee.
    """
    user_table = np.ascontiguousarray(user_table, dtype=np.float32)
    item_table = np.ascontiguousarray(item_table, dtype=np.float32)
    user_ids = np.ascontiguousarray(user_ids, dtype=np.int64)
    item_ids = np.ascontiguousarray(item_ids, dtype=np.int64)
    for name, tab, ids in (("user", user_table, user_ids), ("item", item_table, item_ids)):
        if tab.ndim != 2:
            raise ValueError(f"{name}_table must be 2-D [rows, d], got shape {tab.shape}")
        if ids.ndim != 1 or len(ids) != len(tab):
            raise ValueError(f"{name}_ids has shape {ids.shape}, expected [{len(tab)}] (one id per {name}_table row)")
        if len(np.unique(ids)) != len(ids) or (ids < 0).any():
            raise ValueError(f"{name}_ids must be unique non-negative data-set ids")
        if not np.isfinite(tab).all():
            raise ValueError(f"{name}_table holds {int((~np.isfinite(tab)).sum())} non-finite values")
    if user_table.shape[1] != item_table.shape[1]:
        raise ValueError(f"user_table d={user_table.shape[1]} != item_table d={item_table.shape[1]}")
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    raw = {}
    if binding is not None or user_raw_ids is not None or item_raw_ids is not None:
        if binding is None or user_raw_ids is None or item_raw_ids is None:
            raise ValueError("a data-set binding needs the raw ids of the rows: pass binding, user_raw_ids and "
                             "item_raw_ids together (or none of them for an unbound version)")
        if not isinstance(binding, dict):
            raise ValueError(f"binding must be a dict, got {type(binding).__name__}")
        raw = {"user_raw_ids": _raw_id_array("user_raw_ids", user_raw_ids, len(user_table)),
               "item_raw_ids": _raw_id_array("item_raw_ids", item_raw_ids, len(item_table))}

    fs, path = io.get_filesystem(root, s3)
    version = new_version_id()
    vdir = io.join(path, VERSIONS, version)
    arrays = {"user_table": user_table, "item_table": item_table, "user_ids": user_ids, "item_ids": item_ids, **raw}
    names = {**FILES, **RAW_ID_FILES}
    files = {}
    for key, arr in arrays.items():
        data = _npy_bytes(arr)
        io.write_bytes(fs, io.join(vdir, names[key]), data)
        files[names[key]] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                             "shape": list(arr.shape), "dtype": str(arr.dtype)}
    manifest = _jsonable({
        "format": FORMAT,
        "version": version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "model_type": model_type,
        "dim": int(user_table.shape[1]),
        "num_user_rows": int(len(user_table)),
        "num_item_rows": int(len(item_table)),
        "data_snapshot": data_snapshot,
        "metrics": metrics,
        "files": files,
        "writer": {"host": socket.gethostname(), "pid": os.getpid()},
        **({"binding": binding} if binding is not None else {}),
    })
    mbytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    _write_atomic(fs, io.join(vdir, MANIFEST_FILE), mbytes)
    pointer = json.dumps({"version": version, "manifest_sha256": hashlib.sha256(mbytes).hexdigest()}).encode()

    with _publish_lock(fs, path):
        for _attempt in range(2):  # the second pass only matters on S3 (no lock): re-assert after a race
            current = _read_pointer(fs, path, root)
            if current is not None and current["version"] >= version:
                if current["version"] > version:
                    progress(f"[cf.store] {root}: newer version {current['version']} already published; "
                             f"{version} is kept but not made latest")
                break
            _write_atomic(fs, io.join(path, POINTER), pointer)
        progress(f"[cf.store] published {version} to {root}")
        _clean_up(fs, path, root, keep, progress)
    return version


def _clean_up(fs: pafs.FileSystem, path: str, root: str, keep: int, progress) -> None:
    complete, incomplete = _scan(fs, path)
    ptr = _read_pointer(fs, path, root)
    protected = {ptr["version"]} if ptr else set()
    doomed = [v for v in complete[:-keep] if v not in protected]
    now = dt.datetime.now(dt.timezone.utc)
    for v in incomplete:
        t = _id_time(v)
        if t is not None and (now - t).total_seconds() > STALE_INCOMPLETE_S:
            doomed.append(v)
    for v in doomed:
        try:
            fs.delete_dir(io.join(path, VERSIONS, v))
            progress(f"[cf.store] deleted old version {v}")
        except (FileNotFoundError, OSError) as exc:  # another publisher cleaned it first
            progress(f"[cf.store] could not delete {v}: {exc}")


def load_version(root: str, version: Optional[str] = None, s3: Optional[S3Config] = None) -> EmbeddingVersion:
    """Loads and verifies a version (None = the ``latest`` pointer's).

    Raises FileNotFoundError when nothing is published or the named version does not exist, and
    CorruptVersionError (a ValueError) naming the version when a file is missing, a checksum, dtype or
    shape disagrees with the manifest, or the manifest disagrees with the pointer.
    """
    fs, path = io.get_filesystem(root, s3)
    if version is not None:
        return _load(fs, path, root, version, None)
    for attempt in range(3):
        ptr = _read_pointer(fs, path, root)
        if ptr is None:
            raise FileNotFoundError(f"no published embedding version under {root} (no '{POINTER}' pointer)")
        try:
            return _load(fs, path, root, ptr["version"], ptr.get("manifest_sha256"))
        except (FileNotFoundError, CorruptVersionError):
            # A publish moved the pointer and its clean-up removed this version while we read it: read the
            # pointer again. A pointer that did not move means the fault is real: raise it.
            if attempt == 2 or _read_pointer(fs, path, root) == ptr:
                raise
    raise AssertionError("unreachable")


def _load(fs: pafs.FileSystem, path: str, root: str, version: str, manifest_sha: Optional[str]) -> EmbeddingVersion:
    vdir = io.join(path, VERSIONS, version)
    where = f"embedding version {version} under {root}"
    try:
        mbytes = _read_bytes(fs, io.join(vdir, MANIFEST_FILE))
    except FileNotFoundError:
        if io.exists(fs, vdir):
            raise CorruptVersionError(f"{where} is incomplete: {MANIFEST_FILE} is missing "
                                      "(the publish crashed or is still running)") from None
        raise FileNotFoundError(f"{where} does not exist; available: {_scan(fs, path)[0]}") from None
    if manifest_sha is not None and hashlib.sha256(mbytes).hexdigest() != manifest_sha:
        raise CorruptVersionError(f"{where}: {MANIFEST_FILE} does not match the sha256 recorded in '{POINTER}'")
    try:
        manifest = json.loads(mbytes.decode("utf-8"))
    except ValueError as exc:
        raise CorruptVersionError(f"{where}: {MANIFEST_FILE} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != version:
        raise CorruptVersionError(f"{where}: manifest format/version is {manifest.get('format')!r}/"
                                  f"{manifest.get('version')!r}, expected {FORMAT!r}/{version!r}")
    listed = manifest.get("files") or {}
    wanted = dict(FILES)
    if "binding" in manifest or any(f in listed for f in RAW_ID_FILES.values()):
        wanted.update(RAW_ID_FILES)  # a bound version: its raw ids are as required as its tables
    arrays = {}
    for key, fname in wanted.items():
        meta = listed.get(fname)
        if meta is None:
            raise CorruptVersionError(f"{where}: manifest lists no entry for {fname}")
        try:
            data = _read_bytes(fs, io.join(vdir, fname))
        except FileNotFoundError:
            if not io.exists(fs, io.join(vdir, MANIFEST_FILE)):
                raise FileNotFoundError(f"{where} was deleted (clean-up of old versions) while loading; "
                                        f"available: {_scan(fs, path)[0]}") from None
            raise CorruptVersionError(f"{where}: file {fname} is missing") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.get("sha256"):
            raise CorruptVersionError(f"{where}: checksum mismatch for {fname} "
                                      f"(sha256 {digest[:16]}..., manifest {str(meta.get('sha256'))[:16]}...)")
        try:
            arr = np.load(_io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise CorruptVersionError(f"{where}: {fname} is not a readable .npy array: {exc}") from exc
        if list(arr.shape) != list(meta.get("shape", [])) or str(arr.dtype) != meta.get("dtype"):
            raise CorruptVersionError(f"{where}: {fname} has shape {list(arr.shape)} {arr.dtype}, "
                                      f"manifest says {meta.get('shape')} {meta.get('dtype')}")
        arrays[key] = arr
    d = manifest.get("dim")
    expect = {"user_table": (manifest.get("num_user_rows"), d), "item_table": (manifest.get("num_item_rows"), d),
              "user_ids": (manifest.get("num_user_rows"),), "item_ids": (manifest.get("num_item_rows"),),
              "user_raw_ids": (manifest.get("num_user_rows"),), "item_raw_ids": (manifest.get("num_item_rows"),)}
    for key, arr in arrays.items():
        if tuple(arr.shape) != tuple(expect[key]):
            raise CorruptVersionError(f"{where}: {wanted[key]} has shape {tuple(arr.shape)}, "
                                      f"expected {tuple(expect[key])} from the manifest (dim, num_*_rows)")
    return EmbeddingVersion(version, arrays["user_table"], arrays["item_table"], arrays["user_ids"],
                            arrays["item_ids"], manifest, arrays.get("user_raw_ids"), arrays.get("item_raw_ids"))
