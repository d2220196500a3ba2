"""Soak test (opt-in: ``python -m pytest tests/test_soak.py -m soak``; CI does not run it): load and scale on
one machine. 4 CPU workers train 2,000 steps of the embedded default while the real CF refresh job publishes a
new embedding version every 200 steps and one worker is SIGKILLed at step 1,000. The run must finish with every
step recorded once, one in-place restart, the expected checkpoints complete, and every published version swapped
in by all four ranks at the same step. Its figures (wall time, restarts, pickup pauses) are printed and go to the
README ("Failures")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

STEPS, REFRESH_EVERY, KILL_AT, WORKERS = 2000, 200, 1000, 4


def _latest_step(metrics_path: str) -> int:
    """The last training step in a run's metrics.jsonl (written in place on a local storage path)."""
    try:
        with open(metrics_path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or a line being written
        return 0
    return max((r["step"] for r in lines if r.get("kind") == "train"), default=0)


@pytest.mark.soak
def test_soak_four_workers_live_refresh_and_a_worker_kill(tmp_path):
    from ckf_dist import cf_refresh
    from ckf_dist.cf.store import list_versions
    from ckf_dist.config import load_config, resolve_embeddings_path

    home, storage = tmp_path / "home", tmp_path / "runs"
    common = [f"data.path={tmp_path}/data", f"cf.embeddings_path={tmp_path}/cf", f"checkpoint.storage_path={storage}",
              "checkpoint.run_name=soak"]
    args = common + [f"training.max_steps={STEPS}", "training.eval_rows=0", "training.log_every=10",
                     "checkpoint.every_steps=100", "cf.refresh_check_every_steps=10", f"ray.num_workers={WORKERS}",
                     "ray.cpus_per_worker=0.5", f"ray.local_num_cpus={WORKERS + 1}", "ray.max_failures=3"]
    env = dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1", CKF_FAULT_KILL_AT_STEP=str(KILL_AT))
    env.pop("RAY_ADDRESS", None)
    refresh_cfg = load_config(common + ["cf.reader=arrow"])
    published: list[tuple[int, str, float]] = []  # (step seen when published, version, refresh seconds)
    done = threading.Event()

    def refresher():  # the refresh job, on a step schedule: the real refresh_once, as the cron job runs it
        metrics = str(storage / "soak" / "metrics.jsonl")
        due = REFRESH_EVERY
        while not done.is_set() and due < STEPS:
            step = _latest_step(metrics)
            if step >= due:
                t0 = time.time()
                version = cf_refresh.refresh_once(refresh_cfg, progress=lambda m: None)
                published.append((step, version, time.time() - t0))
                due += REFRESH_EVERY
            time.sleep(0.5)

    thread = threading.Thread(target=refresher, daemon=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "ckf_dist.train", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = False
    out_lines = []
    for line in proc.stdout:
        out_lines.append(line)
        if not started and "CF embeddings:" in line:  # the first version exists: the schedule can begin
            thread.start()
            started = True
    rc = proc.wait()
    wall = time.time() - t0
    done.set()
    if started:
        thread.join(timeout=120)
    out = "".join(out_lines)
    assert rc == 0, out[-5000:]
    assert f"done: step {STEPS}" in out, out[-3000:]

    run = storage / "soak"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_steps = [r["step"] for r in lines if r["kind"] == "train"]
    assert train_steps == list(range(10, STEPS + 1, 10))  # every logged step once, in order, none lost or repeated
    final = [r for r in lines if r["kind"] == "final"][-1]
    restarts = [r for r in lines if r["kind"] == "resume" and r.get("restart")]
    assert final["final/restarts"] == 1 and len(restarts) == 1 and restarts[0]["step"] == KILL_AT

    # checkpoints: the kept ones are the last multiples of checkpoint.every_steps, each with every rank's shards
    ckpts = sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert ckpts, list(run.iterdir())
    assert len(ckpts) == 2  # checkpoint.keep: the steps 1900 and 2000, each complete on every rank
    assert [json.loads((c / "trainer_state.json").read_text())["step"] for c in ckpts] == [STEPS - 100, STEPS]
    assert all((c / f"complete_rank{r}.json").exists() for c in ckpts for r in range(WORKERS))
    swaps = [json.loads((ckpts[-1] / f"cf_swaps_rank{r}.json").read_text()) for r in range(WORKERS)]
    # the same versions at the same steps on every rank (the pauses are each rank's own)
    assert all([(s["step"], s["version"], s["user_table_sha256"]) for s in ranks] ==
               [(s["step"], s["version"], s["user_table_sha256"]) for s in swaps[0]] for ranks in swaps), swaps

    # every version the refresh job published was swapped in (at the same step on every rank), in order
    versions = [v for _, v, _ in published]
    assert len(versions) == STEPS // REFRESH_EVERY - 1, published
    assert [s["version"] for s in swaps[0]] == versions, (swaps[0], published)
    for (seen, _, _), swap in zip(published, swaps[0]):
        assert swap["step"] >= seen and swap["step"] % 10 == 0
    embeddings = resolve_embeddings_path(refresh_cfg)
    assert versions[-1] in list_versions(embeddings)
    pauses = [max(ranks[i]["pause_s"] for ranks in swaps) for i in range(len(swaps[0]))]  # the slowest rank's
    summary = dict(wall_s=round(wall, 1), steps=STEPS, workers=WORKERS, restarts=final["restarts"],
                   refreshes=len(published), refresh_s=[round(s, 1) for _, _, s in published],
                   swaps=len(swaps[0]), swap_steps=[s["step"] for s in swaps[0]], pickup_pause_s=pauses,
                   checkpoints_kept=[p.name for p in ckpts])
    print("SOAK", json.dumps(summary))
