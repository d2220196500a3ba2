"""Fault tolerance of a training run (issue 16, item 1): bad data shards are refused by the driver before anything
is written; a corrupt newest checkpoint is skipped for the previous complete one; a killed driver is resumed by
rerunning the same command. Real components: the moto S3 server, a local Ray, DeepSpeed ZeRO-3 on 2 CPU workers.
(The in-place restart after a worker kill is tests/test_train_integration.py::test_worker_killed_mid_run_restarts_in_place.)"""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.test_train_integration import _cfg, ray_local  # noqa: F401  (ray_local: a module fixture)

pytestmark = pytest.mark.integration


def _listing(fs, root: str) -> list[str]:
    import pyarrow.fs as pafs

    from ckf_dist.data import io

    if not io.exists(fs, root):
        return []
    return sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)))


@pytest.mark.parametrize("where, damage", [("s3", "truncated"), ("local", "missing_column")])
def test_bad_shard_refused_before_anything_is_written(s3_server, ray_local, tmp_path, where, damage):  # noqa: F811
    """A truncated prompt shard (on S3) and a shard without the ``answer`` column (local): ``run`` raises before
    any training step, naming the file (and the column); the storage folder, the CF store and the data set's
    folder have nothing new."""
    import pyarrow as pa

    from ckf_dist.config import resolve_embeddings_path
    from ckf_dist.data import io
    from ckf_dist.data.prepare import prepare
    from ckf_dist.data.validate import DataSetError
    from ckf_dist.train import run

    if where == "s3":
        extra = {"data.path": f"s3://ckf-test/data/bad-{damage}", "checkpoint.storage_path": f"s3://ckf-test/bad-{damage}"}
    else:
        extra = {"data.path": str(tmp_path / "data"), "checkpoint.storage_path": str(tmp_path / "runs")}
    cfg = _cfg(s3_server, "bad-data", 4, **extra)
    prepare(cfg, progress=lambda m: None)
    fs, root = io.get_filesystem(cfg.data.path, cfg.data.s3)
    shard = io.join(root, "prompts", "train", "part-00000.parquet")
    data = io.read_bytes(fs, shard)
    if damage == "truncated":  # a copy cut short: the footer (and its magic bytes) is gone
        io.write_bytes(fs, shard, data[: len(data) // 2])
    else:
        table = pq.read_table(pa.BufferReader(data))
        pq.write_table(table.drop_columns(["answer"]), shard, filesystem=fs)
    data_before = _listing(fs, root)
    sfs, storage = io.get_filesystem(cfg.checkpoint.storage_path, cfg.data.s3)
    efs, embeddings = io.get_filesystem(resolve_embeddings_path(cfg), cfg.data.s3)

    with pytest.raises(DataSetError) as err:
        run(cfg)
    msg = str(err.value)
    assert io.join(cfg.data.path, "prompts", "train", "part-00000.parquet") in msg, msg
    if damage == "truncated":
        assert "not a readable parquet file" in msg, msg
    else:
        assert "column 'answer' missing" in msg, msg
    assert "1 unusable shard(s)" in msg, msg  # the other shards are fine
    assert _listing(sfs, storage) == []  # no run folder, no checkpoint, no metrics
    assert _listing(efs, embeddings) == []  # no CF version trained
    assert _listing(fs, root) == data_before
