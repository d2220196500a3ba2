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


def _checkpoints(cfg) -> dict[str, dict]:
    """{checkpoint folder name: {relative file: size}} of a run's folder."""
    import pyarrow.fs as pafs

    from ckf_dist.data import io
    from ckf_dist.metrics_log import run_folder

    fs, root = io.get_filesystem(run_folder(cfg), cfg.data.s3)
    if not io.exists(fs, root):
        return {}
    out: dict[str, dict] = {}
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = f.path[len(root) + 1:]
        if rel.startswith("checkpoint_") and "/" in rel and f.type == pafs.FileType.File:
            name, inner = rel.split("/", 1)
            out.setdefault(name, {})[inner] = f.size
    return out


def _registered_step(cfg) -> int:
    """The step of the latest checkpoint Ray Train registered (its checkpoint manager's snapshot in the run folder
    names it); 0 before the first, -1 when read half-rewritten. Ray Train registers a checkpoint some seconds
    after its upload (its controller polls the workers every 2 s), so an upload alone does not make the
    checkpoint the one a rerun resumes from."""
    import json

    from ckf_dist.data import io
    from ckf_dist.metrics_log import run_folder
    from ckf_dist.worker import STATE_FILE

    fs, root = io.get_filesystem(run_folder(cfg), cfg.data.s3)
    snap = io.join(root, "checkpoint_manager_snapshot.json")  # ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    if not io.exists(fs, snap):
        return 0
    try:
        latest = json.loads(io.read_bytes(fs, snap))["latest_checkpoint_result"]
    except ValueError:  # read while the controller rewrites it (moto serves the object being replaced)
        return -1
    return io.read_json(fs, io.join(root, latest["checkpoint_dir_name"], STATE_FILE))["step"] if latest else 0


def test_driver_killed_rerun_resumes_then_corrupt_newest_checkpoint_is_skipped(s3_server, ray_local, tmp_path, capfd):  # noqa: F811
    """(1) ``python -m ckf_dist.train ...`` SIGKILLed once its step-4 checkpoint is registered; the same command
    run again resumes from the latest checkpoint Ray Train registered and finishes: steps 1-8 each logged once,
    Adam stepped 8 times, and the adapter equals an uninterrupted run's bit for bit (deterministic data order,
    RNG state in the checkpoints: see test_worker_killed_mid_run_restarts_in_place for why equality, not a
    tolerance). (2) A shard of the newest checkpoint (step 8) is then truncated in S3: a longer run with the
    same name skips it, says so, resumes from the step-6 checkpoint and trains steps 7-10."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray
    import torch

    from ckf_dist.data import io
    from ckf_dist.metrics_log import JSONL, run_folder
    from ckf_dist.train import run
    from tests.test_train_integration import _adapter, _args

    steps, opts = 8, {"training.eval_rows": 0, "training.deterministic_data": "true"}
    # the uninterrupted reference (test_worker_killed_mid_run_restarts_in_place's; a finished run reruns as a no-op)
    ref = run(_cfg(s3_server, "nofault-run", steps, **opts))
    assert ref.metrics["step"] == steps and ref.metrics["restarts"] == 0  # a reference without a worker failure
    cfg = _cfg(s3_server, "driver-kill-run", steps, **opts)
    # the driver joins this test's local Ray: the kill ends its job (workers included), not the cluster
    cmd = [sys.executable, "-m", "ckf_dist.train"] + _args(
        s3_server, "driver-kill-run", steps, **opts, **{"ray.address": ray.get_runtime_context().gcs_address})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / "first.log", "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and _registered_step(cfg) < 4:
            time.sleep(0.3)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = _registered_step(cfg)  # read again: the driver is gone, nothing registers any more
    assert 4 <= killed_at < steps, killed_at

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    assert f"resuming from checkpoint at step {killed_at}" in rerun.stdout, rerun.stdout[-3000:]
    fs, folder = io.get_filesystem(run_folder(cfg), cfg.data.s3)
    lines = [json.loads(x) for x in io.read_bytes(fs, io.join(folder, JSONL)).decode().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, steps + 1))
    assert [(r["kind"], r["step"], r.get("restart")) for r in lines if r["kind"] != "train"] == [
        ("resume", killed_at, False), ("final", steps, None)]
    final = lines[-1]
    assert final["final/step"] == steps and final["final/optimizer_step"] == steps
    assert final["final/resumed_from_step"] == killed_at
    a, b = _adapter(_cfg(s3_server, "nofault-run", steps)), _adapter(cfg)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k] - b[k]).abs().max()))

    # (2) truncate rank 1's optimizer shard of the newest checkpoint (the final one, step 8)
    ckpts = _checkpoints(cfg)
    newest = max(ckpts)
    assert io.read_json(*_fs_path(cfg, newest, "trainer_state.json"))["step"] == steps
    shard = next(rel for rel in ckpts[newest] if rel.endswith("optim_states.pt") and "rank_1" in rel)
    sfs, spath = _fs_path(cfg, newest, shard)
    io.write_bytes(sfs, spath, io.read_bytes(sfs, spath)[: ckpts[newest][shard] // 2])
    capfd.readouterr()
    longer = run(_cfg(s3_server, "driver-kill-run", steps + 2, **opts))
    said = capfd.readouterr().out
    m = longer.metrics
    assert m["skipped_checkpoints"] == [{"checkpoint": newest, "why": f"{shard} (rank 1) is "
                                         f"{ckpts[newest][shard] // 2} bytes, its manifest says {ckpts[newest][shard]}"}]
    assert f"skipping checkpoint {newest}: {shard} (rank 1)" in said, said[-3000:]
    assert "the newest complete checkpoint; skipped " + newest in said, said[-3000:]
    assert m["resumed_from_step"] == steps - 2 and m["resumed"]["optimizer_step"] == steps - 2
    assert m["step"] == steps + 2 and m["optimizer_step"] == steps + 2
    lines = [json.loads(x) for x in io.read_bytes(fs, io.join(folder, JSONL)).decode().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, steps + 3))


def _fs_path(cfg, checkpoint: str, rel: str):
    """(filesystem, path) of a file in a checkpoint folder of the run."""
    from ckf_dist.data import io
    from ckf_dist.metrics_log import run_folder

    return io.get_filesystem(io.join(run_folder(cfg), checkpoint, rel), cfg.data.s3)


class _Tee:
    """sys.stdout that also keeps what is written (the driver's console: its own lines and rank 0's)."""

    def __init__(self, real):
        self.real, self.parts = real, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.real.write(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        return "".join(self.parts)


def test_s3_outage_mid_run_is_ridden_out(moto_server, s3_server, ray_local, monkeypatch, tmp_path):  # noqa: F811
    """The S3 server stops after the step-4 checkpoint is uploaded and starts again on the same port once a
    worker has said it waits for it (at least 3 s later). The run finishes without a worker restart: the
    checkpoint uploads wait for the storage (a log line per probe) and every S3 request in flight is retried by
    Arrow (data.s3.retry_attempts). Every checkpoint left in the run folder is complete (its manifests match its
    files), steps 1-8 are logged once each, and the adapter equals the uninterrupted run's bit for bit."""
    import json
    import sys
    import threading
    import time

    import torch

    from ckf_dist.data import io
    from ckf_dist.metrics_log import JSONL, run_folder
    from ckf_dist.resume import storage_problem
    from ckf_dist.train import run
    from ckf_dist.worker import FAULT_PAUSE_ENV
    from tests.test_train_integration import _adapter

    steps, opts = 8, {"training.eval_rows": 0, "training.deterministic_data": "true"}
    ref = run(_cfg(s3_server, "nofault-run", steps, **opts))
    assert ref.metrics["restarts"] == 0  # a reference without a worker failure
    cfg = _cfg(s3_server, "outage-run", steps, **opts, **{"checkpoint.every_steps": 4})
    tee = _Tee(sys.stdout)
    monkeypatch.setattr(sys, "stdout", tee)
    outage: dict = {}
    # Rank 0 pauses after step 4 (its checkpoint uploaded) until the server is down: the outage then starts
    # before the step-8 checkpoint's storage probe, never in the middle of an upload (where Arrow's retries alone
    # would ride it out and no probe would ever see it). Ray Data reads and the Train controller's registry writes
    # that meet the outage are retried by Arrow (data.s3.retry_attempts=10: about 90 s), so the outage is capped
    # at 45 s even if the probe's line never came.
    pause = tmp_path / "pause"
    monkeypatch.setenv(FAULT_PAUSE_ENV, f"4:{pause}")

    def outage_when_training():
        deadline = time.time() + 600
        # paused after step 4 AND the step-4 checkpoint registered: Ray uploads a reported checkpoint in the
        # background, and registers it once every rank's upload is done, so no upload is in flight from here on
        while time.time() < deadline and not ((pause / "paused").exists() and _registered_step(cfg) >= 4):
            time.sleep(0.2)
        moto_server.stop()
        outage["down"] = time.time()
        (pause / "go").touch()
        while time.time() - outage["down"] < 45 and (time.time() - outage["down"] < 3 or "unreachable" not in tee.text()):
            time.sleep(0.2)
        moto_server.start()
        outage["up"] = time.time()

    thread = threading.Thread(target=outage_when_training, daemon=True)
    thread.start()
    try:
        result = run(cfg)
    finally:
        thread.join(timeout=700)
        if "up" not in outage:
            moto_server.start()
    said = tee.text()
    assert "storage s3://ckf-test/runs unreachable" in said and "reachable again after" in said, said[-3000:]
    m = result.metrics
    assert m["restarts"] == 0 and m["step"] == steps and m["optimizer_step"] == steps
    assert m["resumed_from_step"] == 0

    fs, folder = io.get_filesystem(run_folder(cfg), cfg.data.s3)
    names = [p.rsplit("/", 1)[-1] for p in _checkpoints(cfg)]
    assert len(names) == cfg.checkpoint.keep, names
    for name in names:
        assert storage_problem(fs, io.join(folder, name))[0] is None, name
    lines = [json.loads(x) for x in io.read_bytes(fs, io.join(folder, JSONL)).decode().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, steps + 1))
    a, b = _adapter(_cfg(s3_server, "nofault-run", steps)), _adapter(cfg)
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k] - b[k]).abs().max()))
