"""Checkpoint completeness manifests (ckf_dist.resume): what makes a checkpoint folder complete, on a local
folder laid out as Ray Train uploads it (two ranks' files merged into one folder)."""
from __future__ import annotations

import os
import pickle

import pyarrow.fs as pafs

from ckf_dist.resume import NO_MANIFEST, local_problem, storage_problem, write_manifest


def _rank_files(folder, rank: int) -> None:
    os.makedirs(folder / "ds", exist_ok=True)
    (folder / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes(range(256)) * (rank + 3))
    (folder / f"step_rank{rank}.json").write_text('{"step": 4}')


def _checkpoint(tmp_path):
    """Two ranks write into their own folders (as on their nodes); the upload merges them into one."""
    merged = tmp_path / "checkpoint_2026-11-27_10-00-00.000000"
    merged.mkdir()
    for rank in (0, 1):
        own = tmp_path / f"rank{rank}"
        own.mkdir()
        _rank_files(own, rank)
        write_manifest(str(own), rank, 2, 4)
        for dirpath, _, names in os.walk(own):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), own)
                os.makedirs(os.path.dirname(merged / rel), exist_ok=True)
                os.replace(os.path.join(dirpath, name), merged / rel)
    return merged


def test_complete_checkpoint_passes(tmp_path):
    ckpt = _checkpoint(tmp_path)
    why, manifests = storage_problem(pafs.LocalFileSystem(), str(ckpt))
    assert why is None and sorted(manifests) == [0, 1]
    assert manifests[1]["files"]["ds/zero_pp_rank_1_optim_states.pt"]["size"] == 256 * 4
    assert local_problem(str(ckpt), manifests, [0, 1]) is None


def test_truncated_missing_and_changed_files_are_found(tmp_path):
    fs = pafs.LocalFileSystem()
    ckpt = _checkpoint(tmp_path)
    shard = ckpt / "ds" / "zero_pp_rank_1_optim_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    assert storage_problem(fs, str(ckpt))[0] == (
        "ds/zero_pp_rank_1_optim_states.pt (rank 1) is 100 bytes, its manifest says 1024")
    # same size, other bytes: only the checksum of the local copy tells
    shard.write_bytes(bytes(reversed(data)))
    why, manifests = storage_problem(fs, str(ckpt))
    assert why is None
    assert local_problem(str(ckpt), manifests, [0]) is None  # rank 0 does not check rank 1's shard
    assert local_problem(str(ckpt), manifests, [0, 1]) == "ds/zero_pp_rank_1_optim_states.pt (rank 1) fails its SHA-256 check"
    shard.unlink()
    assert storage_problem(fs, str(ckpt))[0] == "ds/zero_pp_rank_1_optim_states.pt (rank 1) missing"


def test_missing_rank_manifest_and_no_manifest(tmp_path):
    fs = pafs.LocalFileSystem()
    ckpt = _checkpoint(tmp_path)
    (ckpt / "complete_rank1.json").unlink()  # rank 1's upload cut short before its manifest arrived
    assert storage_problem(fs, str(ckpt))[0] == "complete_rank1.json missing (world size 2): an upload was cut short"
    (ckpt / "complete_rank0.json").unlink()
    assert storage_problem(fs, str(ckpt))[0] == NO_MANIFEST


def test_s3_filesystem_keeps_its_retry_setting_when_pickled():
    """Ray pickles the storage filesystem to its controller and workers; a plain pyarrow S3FileSystem would come
    back with Arrow's default 3 attempts."""
    from ckf_dist.config import S3Config
    from ckf_dist.data import io

    fs, _ = io.get_filesystem("s3://bucket/x", S3Config(endpoint_url="http://127.0.0.1:9", access_key_id="k",
                                                        secret_access_key="s", retry_attempts=7))
    copy = pickle.loads(pickle.dumps(fs))
    assert isinstance(copy, io.RetryingS3FileSystem) and isinstance(copy, pafs.S3FileSystem)
    assert copy._ckf_args == fs._ckf_args and copy._ckf_args[0] == 7
    assert copy.equals(fs)
