"""``python -m ckf_dist.profile`` end to end on the embedded default (CPU, 2 Ray workers, DeepSpeed ZeRO-3), at a
smaller data set and fewer steps: profile.json's figures, the PNG chart and the Perfetto-loadable trace."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_profile_writes_report_chart_and_trace(tmp_path):
    from ckf_dist.profile import BREAKDOWN

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    # the embedded default with its data, runs and output under tmp_path (HOME kept: DeepSpeed's compiled
    # communication op stays cached), on a smaller data set read without Ray Data for the CF refresh
    args = [f"data.path={tmp_path}/data", f"checkpoint.storage_path={tmp_path}/runs", "cf.reader=arrow",
            "data.num_users=80", "data.num_items=60", "data.interactions_per_user=16", "cf.epochs=3",
            "training.batch_size=8", "profile.warmup_steps=1", "profile.steps=2", "profile.trace_steps=1"]
    proc = subprocess.run([sys.executable, "-m", "ckf_dist.profile", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "total:" in out and "real tokens/s" in out, out[-3000:]

    report = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert report["world_size"] == 2 and len(report["workers"]) == 2
    assert report["switches"]["zero_stage"] == 3 and report["measured_steps"] == 2
    for w in report["workers"]:
        assert w["measured_steps"] == 2
        # the sections and "other" make up the step; each section took time where work happened
        assert sum(w["breakdown_s"][k] for k in BREAKDOWN) == pytest.approx(w["step_s"], rel=1e-6)
        assert all(w["breakdown_s"][k] > 0 for k in ("data_wait", "forward", "backward", "optimizer", "checkpoint"))
        assert w["checkpoint_save_s"] > 0 and w["checkpoint_every_steps"] == 100  # one save timed, amortised
        assert 0 < w["tokens_per_step"] <= w["padded_tokens_per_step"]  # padding excluded from the real count
        assert w["tokens_per_s"] > 0 and w["samples_per_step"] == 2 * 8  # text + hybrid form of each of 8 rows
        assert 0 < w["mfu"] <= 1 and w["peak_source"].startswith("measured matmul probe")
        assert w["model_flops_per_step"]["total"] > w["model_flops_per_step"]["base_linear"] > 0
        assert w["peak_memory_bytes"] > 0
    total = report["total"]
    assert total["tokens_per_s"] == pytest.approx(sum(w["tokens_per_s"] for w in report["workers"]))
    assert 0 < total["mfu"] <= 1

    png = (tmp_path / "profile" / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer"} <= names  # the worker's sections, labelled in the trace
    assert any(e.get("ph") == "X" and "dur" in e for e in trace["traceEvents"])  # complete events Perfetto draws
