"""A readable console: the driver prints its own lines and rank 0's progress (a live status line on a terminal,
one line per ``training.log_every`` otherwise); Ray Data's progress blocks, Ray Train's controller lines and the
workers' warnings stay in Ray's log folder."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from ckf_dist import console as C


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration_and_eta():
    assert [C.format_duration(s) for s in (None, -1, 0, 7.4, 65, 3723)] == ["?", "?", "0:00", "0:07", "1:05", "1:02:03"]
    assert C.eta_seconds(step=0, total=800, seconds=3.0, start_step=0, start_seconds=0.0) is None
    assert C.eta_seconds(step=200, total=800, seconds=30.0, start_step=0, start_seconds=0.0) == pytest.approx(90.0)
    # a resumed attempt: only this attempt's steps and seconds count
    assert C.eta_seconds(step=500, total=800, seconds=80.0, start_step=400, start_seconds=60.0) == pytest.approx(60.0)
    # training.max_minutes: never later than the budget's end
    assert C.eta_seconds(step=200, total=800, seconds=30.0, start_step=0, start_seconds=0.0, budget_s=50.0) == 20.0


def test_status_line():
    assert C.status_line(200, 800, 0.41234, 25_940.0, 90.0, bar_width=8) == \
        "[##......] 200/800 steps  loss 0.4123  25.9k tok/s  ETA 1:30"
    assert C.status_line(0, 800, None, None, None, bar_width=4) == "[....] 0/800 steps  ETA ?"


def _step(step, text=None):
    return {"kind": "step", "step": step, "total": 40, "loss": 0.5, "tokens_per_s": 900.0, "eta_s": 10.0, "text": text}


def test_console_without_a_terminal_prints_the_log_every_lines_only():
    out = io.StringIO()
    con = C.Console(out)
    assert not con.live
    con.handle({"kind": "line", "text": "[rank 0] model: ..."})
    for s in range(1, 41):
        con.handle(_step(s, f"[rank 0] step {s}/40" if s % 20 == 0 else None))
    con.status("ignored")
    con.close()
    assert out.getvalue() == "[rank 0] model: ...\n[rank 0] step 20/40\n[rank 0] step 40/40\n"


def test_console_on_a_terminal_keeps_one_live_line_under_the_others():
    out = _Tty()
    con = C.Console(out)
    assert con.live
    con.handle(_step(1))
    con.line("[ckf_dist] a line")
    con.handle(_step(20, "[rank 0] step 20/40 ..."))  # on a terminal the live line stands for the log line
    con.close()
    text = out.getvalue()
    first = C.status_line(1, 40, 0.5, 900.0, 10.0)
    assert text.startswith("\r" + first + "\r\x1b[2K[ckf_dist] a line\n\r" + first)
    assert text.endswith("\r" + C.status_line(20, 40, 0.5, 900.0, 10.0) + "\n")
    assert "[rank 0] step 20/40" not in text


def test_details_show_on_the_live_line_only_until_the_next_line():
    out = _Tty()
    con = C.Console(out)
    C.activate(con)
    try:
        C.detail("[ckf_dist] [cf] epoch 3/40 ...")
        C.say("[ckf_dist] CF embeddings: v1")
    finally:
        C.activate(None)
    con.close()
    assert out.getvalue() == "\r[ckf_dist] [cf] epoch 3/40 ...\r\x1b[2K[ckf_dist] CF embeddings: v1\n"
    plain = io.StringIO()
    C.activate(C.Console(plain))
    try:
        C.detail("[ckf_dist] [cf] epoch 3/40 ...")  # no terminal: dropped (--verbose prints them)
    finally:
        C.activate(None)
    assert plain.getvalue() == ""


class _Sink:
    def __init__(self):
        self.sent = []
        self.put = self  # sink.put.remote(msg)

    def remote(self, msg):
        self.sent.append(msg)


def test_worker_progress_throttles_status_but_never_log_lines(monkeypatch):
    sink, stdout = _Sink(), io.StringIO()
    clock = [0.0]
    monkeypatch.setattr(C.time, "monotonic", lambda: clock[0])
    wp = C.WorkerProgress(sink, interval=0.5, stream=stdout)
    wp.line("model: 3 parameters")
    for s in range(1, 11):
        clock[0] = s * 0.1
        wp.step(s, 10, 0.5, 100.0, 1.0, text=f"step {s}/10" if s == 4 else None)
    kinds = [(m["kind"], m.get("step"), m["text"]) for m in sink.sent]
    assert kinds == [("line", None, "[rank 0] model: 3 parameters"), ("step", 1, None), ("step", 4, "[rank 0] step 4/10"),
                     ("step", 9, None), ("step", 10, None)]
    assert stdout.getvalue() == "[rank 0] model: 3 parameters\n[rank 0] step 4/10\n"  # Ray's log folder keeps them


def test_collate_object_is_ray_datas_collate_class():
    """``iter_torch_batches(collate_fn=<function>)`` is deprecated since Ray 2.47 (a RayDeprecationWarning in every
    worker, every epoch); the worker passes a ``NumpyBatchCollateFn`` instance."""
    import numpy as np
    from ray.data.collate_fn import NumpyBatchCollateFn

    from ckf_dist.data.collate import collate_prompts, prompt_collate_fn

    fn = prompt_collate_fn(pad_id=0, num_tasks=4)
    assert isinstance(fn, NumpyBatchCollateFn)
    ids = lambda *xs: np.array([np.array(x, dtype=np.int64) for x in xs], dtype=object)  # noqa: E731
    batch = {"task_id": np.array([2, 0]), "text_prompt_ids": ids([5, 6], [7]), "hybrid_prompt_ids": ids([5, 9, 6], [9, 7]),
             "answer_ids": ids([3], [4, 4]), "history_item_ids": ids([1], [2]), "target_item_ids": ids([3], [4]),
             "user_id": np.array([1, 2]), "label": np.array([1.0, 0.0])}
    got, want = fn(batch), collate_prompts(batch, 0, 4)
    assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)


@pytest.mark.integration
@pytest.mark.parametrize("packing", [False, True])
def test_a_short_run_prints_a_short_console(tmp_path, packing):
    """A 6-step run in a fresh HOME: before, 367 lines for 2 steps (Ray Data progress blocks, Ray Train controller
    lines, RayDeprecationWarning / FutureWarning from every worker, DeepSpeed's build lines, the auth notices);
    now the driver's lines, rank 0's lines and the held-out table. Run padded and packed (training.packing):
    the step lines give the tokens per step, real and with padding."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    cache = os.path.expanduser("~/.cache/torch_extensions")
    if os.path.isdir(cache):
        env["TORCH_EXTENSIONS_DIR"] = cache
    args = ["training.max_steps=6", "training.log_every=2", "data.num_users=40", "data.num_items=30",
            "data.interactions_per_user=10", "model.tiny.pretrain_steps=5", "training.eval_rows=8",
            "training.batch_size=4", f"data.path={tmp_path}/data", f"checkpoint.storage_path={tmp_path}/runs",
            f"training.packing={str(packing).lower()}"]
    proc = subprocess.run([sys.executable, "-m", "ckf_dist.train", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    lines = out.splitlines()
    assert len(lines) <= 45, out
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("[rank 0] step ")] == \
        ["[rank 0] step 2/6", "[rank 0] step 4/6", "[rank 0] step 6/6"]
    assert all(" tok/s ETA " in ln for ln in lines if ln.startswith("[rank 0] step "))
    layout = "(packed, rows <= 192 tokens)" if packing else "(padded)"  # 192 = data.max_seq_len
    pattern = re.compile(r"tokens/step/rank ([\d,]+) real ([\d,]+) with padding " + re.escape(layout))
    for ln in lines:
        if ln.startswith("[rank 0] step "):
            real, computed = (float(g.replace(",", "")) for g in pattern.search(ln).groups())
            assert 0 < real <= computed, ln
    for noise in ("Running Dataset", "RayDeprecationWarning", "FutureWarning", "(RayTrainWorker", "(TrainController",
                  "(SplitCoordinator", "Token authentication is", "DeepSpeed", "Writing model shards", "[cf] epoch",
                  "Progress bars disabled"):
        assert noise not in out, noise
    for kept in ("[ckf_dist] started a local Ray", "[rank 0] untrained model on held-out rows",
                 "[rank 0] trained model on held-out rows", "  ctr/auc ", "hybrid - permuted CF tables",
                 "[ckf_dist] done: step 6", f"tensorboard --logdir {tmp_path}/runs/ckf-default/tensorboard"):
        assert kept in out, kept
    # The same run's metrics at a local storage path (written in place): one metrics.jsonl line per logged step
    # and the same steps' scalars in the TensorBoard event files, read by TensorBoard's EventAccumulator.
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "ckf-default"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("heldout", 0), ("train", 2), ("train", 4), ("train", 6),
                                                         ("heldout", 6), ("final", 6)]
    for r in records[1:4]:
        assert {"loss/total", "lambda", "lr/lora", "lr/mapping", "grad_norm", "throughput/tokens_per_s",
                "time/step_s", "time/data_wait_s", "cf/swaps", "cf_version"} <= r.keys(), r
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [
        (r["step"], pytest.approx(r["loss/total"])) for r in records[1:4]]
    assert [e.step for e in acc.Scalars("heldout/before/hybrid/ctr/auc")] == [0]
    assert [e.step for e in acc.Scalars("heldout/after/hybrid/ctr/auc")] == [6]
