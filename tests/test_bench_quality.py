"""The quality benchmark harness (benchmarks/bench_quality.py): the verdict table, and one real end-to-end run
of every step (prepare -> CF refresh -> CKF and text-only training under a time budget -> three evaluations ->
table) on Amazon Musical Instruments with the tiny model, so that a GPU session only has to run it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, shared_dataset

spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "bench_quality.py")
bench_quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_quality)


def _report(metrics: dict) -> dict:
    return {"metrics": {task: {"all": m} for task, m in metrics.items()}}


def test_table_marks_wins_and_losses_against_the_named_baselines():
    results = {"ml100k": {0: {
        "ckf": _report({"ctr": {"auc": 0.70}, "rating": {"rmse": 1.00}, "topk": {"hr@10": 0.50}}),
        "cf-only": _report({"ctr": {"auc": 0.75}, "rating": {"rmse": 1.10}, "topk": {"hr@10": 0.60}}),
        "text-only": _report({"ctr": {"auc": 0.60}, "rating": {"rmse": 0.90}, "topk": {"hr@10": 0.40}}),
    }}}
    results["ml100k"][0]["ckf"]["metrics"]["ctr"]["cold"] = {"auc": 0.80}  # cold users: CKF best, no target
    results["ml100k"][0]["cf-only"]["metrics"]["ctr"]["cold"] = {"auc": 0.55}
    table, records = bench_quality.build_table(results)
    verdict = {(r["task"], r["metric"]): r["verdicts"] for r in records if r["group"] == "all"}
    assert verdict[("ctr", "auc")] == ["cf-only: NO", "text-only: yes"]  # higher is better
    assert verdict[("rating", "rmse")] == ["cf-only: yes", "text-only: NO"]  # lower is better
    assert verdict[("topk", "hr@10")] == ["text-only: yes"]  # CF-only HR@10 is reported, not a target
    assert "| ml100k | ctr | auc (higher better) | all | 0.7000 | 0.7500 | 0.6000 | cf-only |" in table
    assert "| ml100k | rating | rmse (lower better) | all | 1.0000 | 1.1000 | 0.9000 | text-only |" in table
    assert "| ml100k | ctr | auc (higher better) | cold | 0.8000 | 0.5500 | n/a | ckf | - |" in table
    assert not any(r["group"] == "warm" for r in records)  # no run reported warm users: no row
    assert ("explanation", "bleu4") not in verdict  # no run reported it: no row


def test_table_says_when_a_baseline_was_not_run_and_averages_seeds():
    results = {"amazon": {
        0: {"ckf": _report({"rating": {"rmse": 1.0}})},
        1: {"ckf": _report({"rating": {"rmse": 2.0}}), "cf-only": _report({"rating": {"rmse": 1.2}})},
    }}
    _, records = bench_quality.build_table(results)
    (rmse,) = [r for r in records if r["metric"] == "rmse" and r["group"] == "all"]
    assert rmse["values"]["ckf"] == pytest.approx(1.5) and rmse["values"]["cf-only"] == pytest.approx(1.2)
    assert rmse["verdicts"] == ["cf-only: NO", "text-only: not run"]


def test_unknown_dataset_or_override_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_quality.main(["--datasets", "netflix", "--model-source", "tiny"])
    assert "unknown data set 'netflix'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_quality.main(["--model-source", "tiny", "--bogus"])


@pytest.mark.integration
def test_benchmark_runs_end_to_end_on_amazon_with_the_tiny_model(tmp_path):
    shared = shared_dataset("amazon-musical-instruments").parent
    out = tmp_path / "quality"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_quality.py"), "--datasets", "amazon",
           # a time budget that no run reaches, so that the 6-step cap ends training however slow the machine is
           # (the first batch alone waits 10-20 s on 2 CPUs); the budget logic is tests/test_training_clock.py's
           "--model-source", "tiny", "--minutes", "600", "--max-steps", "6", "--eval-rows", "8",
           "--eval-batch", "8", "--shared", str(shared), "--out", str(out),
           "ray.cpus_per_worker=1", "training.batch_size=4", "training.log_every=2",
           "model.tiny.pretrain_steps=30"]  # the harness, not the base: a short pretraining of the tiny base
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "quality.md").read_text()
    assert "| amazon | rating | rmse (lower better) |" in table
    assert "| amazon | explanation | bleu4 (higher better) |" in table
    summary = json.loads((out / "quality.json").read_text())
    (rmse,) = [r for r in summary["records"] if r["task"] == "rating" and r["metric"] == "rmse" and r["group"] == "all"]
    assert all(isinstance(rmse["values"][run], float) for run in ("ckf", "cf-only", "text-only"))
    assert len(rmse["verdicts"]) == 2 and all(v.split(": ")[1] in ("yes", "NO") for v in rmse["verdicts"])
    # each trained run stopped on its step cap (6), was given the time budget, and was evaluated on that adapter
    assert summary["runs"]["amazon-ckf-s0"]["step"] == 6
    assert summary["runs"]["amazon-text-only-s0"]["step"] == 6
    text_report = json.loads((out / "reports" / "amazon-text-only-s0.json").read_text())
    assert text_report["run"]["form"] == "text"
    for run in ("ckf", "text-only"):
        report = json.loads((out / "reports" / f"amazon-{run}-s0.json").read_text())
        assert report["checkpoint"]["step"] == 6 and report["config"]["training"]["max_minutes"] == 600
    assert (out / "amazon.png").stat().st_size > 0
    # a second invocation finds every report and only rebuilds the table
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)  # hang guards only
    assert again.returncode == 0 and again.stdout.count("report exists, skipped") == 3
