"""Filesystems for local folders and ``s3://`` URIs, shared by every job (prepare, training, CF refresh).

An explicit ``pyarrow.fs.S3FileSystem`` is built with the endpoint from the config or the environment: Arrow
does not reliably honour endpoint environment variables by itself. Credentials, first match wins:

1. ``data.s3.access_key_id`` + ``data.s3.secret_access_key`` (static keys in the config; never written out);
2. ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN`` for temporary STS credentials)
   from the environment, passed explicitly so that the filesystem object carries them to Ray workers;
3. neither: Arrow's default AWS credential chain, resolved in every process that uses the filesystem
   (web identity = IRSA / EKS Pod Identity, ``AWS_PROFILE`` and ``~/.aws``, ECS and EC2 instance roles).

A session token is only ever taken from the environment, together with the environment's keys: temporary
credentials expire within hours and have no place in a config file.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import pyarrow.fs as pafs

from ckf_dist.config import S3Config

log = logging.getLogger(__name__)


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def s3_options(s3: Optional[S3Config] = None) -> dict:
    """Endpoint, region and credentials (see the module docstring for the order). ``access_key_id`` = "" means
    Arrow's default credential chain."""
    s3 = s3 or S3Config()
    if s3.access_key_id:
        keys = (s3.access_key_id, s3.secret_access_key, "")
    elif os.environ.get("AWS_ACCESS_KEY_ID"):
        keys = (os.environ["AWS_ACCESS_KEY_ID"], os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                os.environ.get("AWS_SESSION_TOKEN", ""))
    else:
        keys = ("", "", "")
    return {
        "endpoint_url": s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", ""),
        "region": s3.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION", "us-east-1"),
        "access_key_id": keys[0],
        "secret_access_key": keys[1],
        "session_token": keys[2],
    }


def get_filesystem(path: str, s3: Optional[S3Config] = None) -> tuple[pafs.FileSystem, str]:
    """Returns (filesystem, path inside it): ``s3://bucket/a`` -> (S3FileSystem, "bucket/a");
    a local path -> (LocalFileSystem, absolute path with ``~`` expanded)."""
    if is_s3(path):
        opts = s3_options(s3)
        kwargs = {"region": opts["region"]}
        if opts["endpoint_url"]:
            endpoint = opts["endpoint_url"]
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        if opts["access_key_id"]:
            kwargs["access_key"] = opts["access_key_id"]
            kwargs["secret_key"] = opts["secret_access_key"]
            if opts["session_token"]:
                kwargs["session_token"] = opts["session_token"]
        return RetryingS3FileSystem((s3 or S3Config()).retry_attempts, **kwargs), path[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


class RetryingS3FileSystem(pafs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` whose every request (connection errors, 5xx, throttling) is retried up to
    ``attempts`` times with the AWS standard strategy's exponential backoff (10 attempts ride out about 90 s).
    A plain S3FileSystem drops its retry strategy when pickled (Arrow 26 pickles the other options only), so
    the copies that Ray sends to its Train controller (checkpoint registry), workers (checkpoint uploads) and
    Ray Data read tasks would fall back to 3 attempts (about 2 s); this subclass rebuilds it on unpickling."""

    def __init__(self, attempts: int, **kwargs):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
        self._ckf_args = (attempts, kwargs)

    def __reduce__(self):
        return _rebuild_s3, self._ckf_args


def _rebuild_s3(attempts: int, kwargs: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(attempts, **kwargs)


# --------------------------------------------------------------------------- node-local cache of remote files
CACHE_MARKER = ".ckf_cache_complete.json"  # written last into a copy, before it is renamed into place


def _cache_name(uri: str, files: list[tuple[str, int, int]]) -> str:
    """``<last path part>-<16 hex>``: the digest covers the URI and every selected file's name, size and
    modification time, so a changed remote folder (or another selection of it) gets a new entry."""
    digest = hashlib.sha256(json.dumps([uri.rstrip("/"), files]).encode("utf-8")).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1]) or "root"
    return f"{base}-{digest}"


def _copy_file(fs: pafs.FileSystem, src: str, dest: str, size: int) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with fs.open_input_stream(src, compression=None) as fin, open(dest, "wb") as fout:
        while True:
            chunk = fin.read(8 << 20)
            if not chunk:
                break
            fout.write(chunk)
    got = os.path.getsize(dest)
    if got != size:
        raise OSError(f"incomplete download of {src}: {got} of {size} bytes")


def cached_copy(uri: str, cache_root: str, s3: Optional[S3Config] = None,
                select: Optional[Callable[[list[str]], list[str]]] = None, threads: int = 8) -> str:
    """A local copy of the file or folder ``uri`` (``s3://...``) under ``cache_root``, made once per machine.

    Returns the local folder that holds the selected files under their paths relative to ``uri`` (for a file
    ``uri``: the folder holding that one file). ``select`` picks which of the relative paths to copy (default:
    all). The remote listing is read on every call (one LIST) and named in the entry (``_cache_name``).

    Safe for concurrent callers on one machine (the ranks of a node share ``cache_root``): an exclusive
    ``flock`` on ``<entry>.lock`` lets one process download while the others wait and then reuse its copy.
    The download goes to a temporary folder beside the entry and is renamed into place only when every file
    is complete (size checked), so a reader never sees a partial copy; a download that fails or is killed
    leaves no entry (its temporary folder is removed then, or by the next downloader of that entry).
    """
    fs, root = get_filesystem(uri, s3)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        root, only = root.rsplit("/", 1)[0], info.path.rsplit("/", 1)[-1]
        infos = {only: info}
    elif info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        infos = {f.path[len(root) + 1:]: f for f in found if f.type == pafs.FileType.File}
    else:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    names = sorted(infos)
    if select is not None:
        names = sorted(select(names))
    if not names:
        raise FileNotFoundError(f"{uri}: nothing to copy (no file selected out of {len(infos)})")
    files = [(n, int(infos[n].size or 0), int(infos[n].mtime_ns or 0)) for n in names]
    name = _cache_name(uri, files)
    cache_root = os.path.abspath(os.path.expanduser(cache_root))
    final = os.path.join(cache_root, name)
    if os.path.isfile(os.path.join(final, CACHE_MARKER)):
        return final
    os.makedirs(cache_root, exist_ok=True)
    with open(final + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also if this process dies
        if os.path.isfile(os.path.join(final, CACHE_MARKER)):
            return final  # another process finished it while this one waited
        for stale in glob.glob(glob.escape(final) + ".tmp-*"):  # left by a killed downloader
            shutil.rmtree(stale, ignore_errors=True)
        total = sum(size for _, size, _ in files)
        log.info("downloading %s (%d files, %.1f MB) to %s", uri, len(files), total / 1e6, final)
        t0 = time.time()
        tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=cache_root)
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
                jobs = [pool.submit(_copy_file, fs, f"{root}/{rel}", os.path.join(tmp, rel), size)
                        for rel, size, _ in files]
                for job in jobs:
                    job.result()
            with open(os.path.join(tmp, CACHE_MARKER), "w") as f:
                json.dump({"uri": uri, "files": files}, f)
            if os.path.isdir(final):  # an entry without its marker: not ours to trust
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("downloaded %s in %.1f s", uri, time.time() - t0)
    return final


def wait_for_storage(uri: str, s3: Optional[S3Config], log: Callable[[str], None], max_wait_s: float,
                     first_delay_s: float = 1.0, max_delay_s: float = 30.0) -> float:
    """Returns once ``uri``'s storage answers a metadata request (an ``s3://`` bucket; a local path returns at
    once), after at most ``max_wait_s`` seconds of trying: each failed probe (one request, no Arrow retries, so
    the outage is seen within a second) says so through ``log`` and sleeps, doubling from ``first_delay_s`` to
    ``max_delay_s``. Returns the seconds waited; raises the last error when the storage stays unreachable."""
    if not is_s3(uri):
        return 0.0
    import dataclasses

    fs, path = get_filesystem(uri, dataclasses.replace(s3 or S3Config(), retry_attempts=1))
    t0, delay, tries = time.monotonic(), first_delay_s, 0
    while True:
        try:
            fs.get_file_info(path)
            waited = time.monotonic() - t0
            if tries:
                log(f"storage {uri} reachable again after {waited:.0f}s ({tries} failed probes)")
            return waited
        except OSError as exc:
            tries += 1
            waited = time.monotonic() - t0
            if waited + delay > max_wait_s:
                log(f"storage {uri} still unreachable after {waited:.0f}s: giving up ({str(exc).splitlines()[0]})")
                raise
            log(f"storage {uri} unreachable ({str(exc).splitlines()[0][:160]}); retrying in {delay:.0f}s "
                f"(probe {tries}, up to data.s3.outage_wait_s={max_wait_s:g}s)")
            time.sleep(delay)
            delay = min(2 * delay, max_delay_s)


def join(root: str, *parts: str) -> str:
    """Joins path parts with '/' for both local and s3 URIs."""
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts])


def list_files(fs: pafs.FileSystem, folder: str, suffix: str = "") -> list[str]:
    """Sorted paths of the files directly in ``folder`` ending with ``suffix``; FileNotFoundError naming the
    folder when it does not exist."""
    info = fs.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"folder not found: {folder}")
    found = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(suffix))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(fs: pafs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def _require_file(fs: pafs.FileSystem, path: str, name: str) -> None:
    """Raises FileNotFoundError naming ``name`` unless ``path`` is an existing file."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"file not found: {name}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"not a file: {name}")


def read_text(fs: pafs.FileSystem, path: str, encoding: str = "utf-8", display: Optional[str] = None) -> str:
    """Reads a whole text file; raises FileNotFoundError naming it (``display`` = the name to show, e.g. the
    ``s3://`` URI). Undecodable bytes become U+FFFD so a bad line is reported by the parser, not fatal here."""
    _require_file(fs, path, display or path)
    with fs.open_input_stream(path) as f:
        return f.read().decode(encoding, errors="replace")


def delete_if_exists(fs: pafs.FileSystem, path: str) -> None:
    """Removes a file or a folder tree if present (no error when absent)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def read_bytes(fs: pafs.FileSystem, path: str, display: Optional[str] = None) -> bytes:
    """Reads a whole file as bytes; raises FileNotFoundError naming it (``display`` = the name to show)."""
    _require_file(fs, path, display or path)
    with fs.open_input_stream(path, compression=None) as f:  # no transparent .gz decoding: callers decide
        return f.read()


def decompressed_text(data: bytes, name: str, encoding: str = "utf-8") -> tuple[str, str]:
    """(text, display name) of a file's bytes: ``.gz`` is gunzipped; a ``.zip`` must hold exactly one data file
    (shown as ``archive.zip:member``); anything else is read as is. Undecodable bytes become U+FFFD so the
    parser reports the bad line. Raises ValueError naming the file for a corrupt or ambiguous archive."""
    import gzip
    import io as _io
    import zipfile

    lower = name.lower()
    try:
        if lower.endswith(".gz"):
            data = gzip.decompress(data)
        elif lower.endswith(".zip"):
            with zipfile.ZipFile(_io.BytesIO(data)) as zf:
                members = [m for m in zf.namelist()
                           if not m.endswith("/") and not m.startswith("__MACOSX/") and not m.rsplit("/", 1)[-1].startswith(".")]
                if len(members) != 1:
                    raise ValueError(f"{name}: expected exactly one file in the zip archive, found {members}")
                data = zf.read(members[0])
                name = f"{name}:{members[0]}"
                if members[0].lower().endswith(".gz"):
                    data = gzip.decompress(data)
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{name}: cannot decompress ({exc})") from exc
    return data.decode(encoding, errors="replace"), name


def text_lines(text: str):
    """(1-based line number, line) for every line; a final newline does not make an extra empty line and a
    trailing carriage return is dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return enumerate((ln.rstrip("\r") for ln in lines), start=1)
