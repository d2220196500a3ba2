"""ckf_dist.metrics_log: scalars land in real TensorBoard event files (read back with TensorBoard's own
EventAccumulator) and in metrics.jsonl, locally and on the moto S3 server; a resume keeps each step once."""
from __future__ import annotations

import json

import pytest


def _scalars(folder) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard itself reads the folder (all event files, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_scalars_reach_event_files_and_jsonl(tmp_path):
    from ckf_dist.metrics_log import JSONL, TB_DIR, MetricsLog

    run = tmp_path / "runs" / "r1"
    log = MetricsLog(str(run))
    for step in (2, 4):
        log.log("train", step, {"loss/total": 1.0 / step, "lr/lora": 1e-3, "grad_norm": None, "note": "text"},
                {"cf_version": "v1"})
    log.log("final", 4, {"final/step": 4})
    log.close()
    got = _scalars(run / TB_DIR)
    assert got["loss/total"] == [(2, pytest.approx(0.5)), (4, pytest.approx(0.25))]
    assert got["lr/lora"] == [(2, pytest.approx(1e-3)), (4, pytest.approx(1e-3))]
    assert "grad_norm" not in got and "note" not in got  # None and non-numbers are not scalars
    lines = _lines(run / JSONL)
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 2), ("train", 4), ("final", 4)]
    assert lines[0]["loss/total"] == 0.5 and lines[0]["cf_version"] == "v1" and "grad_norm" not in lines[0]


def test_resume_keeps_each_step_once(tmp_path):
    """Attempt 1 logs steps 1..5 (its checkpoint is at step 3), attempt 2 resumes at 3 and logs 4..6: the record
    holds steps 1..6 once each, with attempt 2's values for the steps trained again (4, 5)."""
    from ckf_dist.metrics_log import JSONL, TB_DIR, MetricsLog

    run = tmp_path / "r"
    first = MetricsLog(str(run))
    for step in range(1, 6):
        first.log("train", step, {"loss/total": float(step)})
    first.log("heldout", 5, {"heldout/x": 1.0})  # not a train line: gone on resume
    first.close()
    with open(run / JSONL, "a") as f:
        f.write('{"kind": "train", "st')  # a torn last line (killed mid-write) is dropped too
    second = MetricsLog(str(run), resume_step=3)
    second.log("resume", 3, {}, {"restart": True})
    for step in range(4, 7):
        second.log("train", step, {"loss/total": 10.0 * step})
    second.close()
    lines = _lines(run / JSONL)
    assert [(r["kind"], r["step"]) for r in lines] == [("train", s) for s in (1, 2, 3)] + [("resume", 3)] + [
        ("train", s) for s in (4, 5, 6)]
    assert [r["loss/total"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 40, 50, 60]
    assert len(list((run / TB_DIR).iterdir())) == 2  # one event file per attempt
    assert _scalars(run / TB_DIR)["loss/total"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]

    # a new run (no checkpoint: resume_step 0) replaces the old record
    third = MetricsLog(str(run))
    third.log("train", 1, {"loss/total": 7.0})
    third.close()
    assert [(r["kind"], r["step"]) for r in _lines(run / JSONL)] == [("train", 1)]


def test_s3_run_folder_gets_copies_at_sync(s3_server, tmp_path):
    """On s3:// the files appear at the run folder at ``sync`` (not before), and a resume appends to them."""
    from ckf_dist.config import S3Config
    from ckf_dist.data import io
    from ckf_dist.metrics_log import JSONL, TB_DIR, MetricsLog

    s3 = S3Config(endpoint_url=s3_server, access_key_id="testing", secret_access_key="testing", region="us-east-1")
    uri = "s3://ckf-test/metrics-unit/run"
    fs, root = io.get_filesystem(uri, s3)
    log = MetricsLog(uri, s3)
    log.log("train", 1, {"loss/total": 2.0})
    assert not io.exists(fs, io.join(root, JSONL))
    log.sync()
    assert json.loads(io.read_bytes(fs, io.join(root, JSONL)))["loss/total"] == 2.0
    log.log("train", 2, {"loss/total": 1.0})
    log.close()
    again = MetricsLog(uri, s3, resume_step=2)
    again.log("train", 3, {"loss/total": 0.5})
    again.close()
    text = io.read_bytes(fs, io.join(root, JSONL)).decode()
    assert [json.loads(x)["step"] for x in text.splitlines()] == [1, 2, 3]
    local = tmp_path / "tb"
    local.mkdir()
    events = io.list_files(fs, io.join(root, TB_DIR))
    assert len(events) == 2
    for path in events:
        (local / path.rsplit("/", 1)[-1]).write_bytes(io.read_bytes(fs, path))
    assert _scalars(local)["loss/total"] == [(1, 2.0), (2, 1.0), (3, 0.5)]
