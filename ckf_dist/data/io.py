"""Filesystems for local folders and ``s3://`` URIs, shared by every job (prepare, training, CF refresh).

An explicit ``pyarrow.fs.S3FileSystem`` is built with the endpoint and credentials from the config or the
environment: Arrow does not reliably honour endpoint environment variables by itself.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import pyarrow.fs as pafs

from ckf_dist.config import S3Config


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def s3_options(s3: Optional[S3Config] = None) -> dict:
    """Endpoint/credentials: config values first, then the standard AWS environment variables."""
    s3 = s3 or S3Config()
    return {
        "endpoint_url": s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", ""),
        "region": s3.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION", "us-east-1"),
        "access_key_id": s3.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID", ""),
        "secret_access_key": s3.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
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
        return pafs.S3FileSystem(**kwargs), path[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


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
