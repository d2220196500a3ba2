"""Training metrics users can watch: rank 0's scalars as TensorBoard event files and a ``metrics.jsonl``.

Both live in the run's folder, beside its checkpoints (``<checkpoint.storage_path>/<checkpoint.run_name>/``)::

    tensorboard/events.out.tfevents.*   one event file per attempt (a resume adds one; TensorBoard merges them)
    metrics.jsonl                       one JSON object per line, e.g.
        {"kind": "train", "step": 20, "time": 1796000000.0, "loss/total": 0.41, "lambda": 0.9, ...}
        kinds: "train" (every training.log_every steps), "heldout" (the before/after evaluation, at step 0
        and at the final step), "final" (the run's final metrics), "resume" (where an attempt restarted).

The event files are written with torch's ``SummaryWriter`` (the ``tensorboard`` package's format; never
hand-rolled). A local storage path is written in place; for ``s3://`` the files are written to a local temp
folder and copied whole to the run folder with the pyarrow filesystem of ``ckf_dist.data.io`` at every
checkpoint and at the end (``sync``): event files only grow, and at one line per logged step they stay small.

Resume (by rerun, or in place after a worker failure): the run continues from its checkpoint's step ``k``, so
every line after step ``k`` belongs to steps that are trained again. ``metrics.jsonl`` keeps the lines of
steps ``< k`` and the "train" line of step ``k``, then appends; the new event file starts with
``purge_step = k + 1`` (a SessionLog.START event), which makes TensorBoard drop the older files' values after
step ``k``. Each step is therefore recorded exactly once.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from ckf_dist.data import io

TB_DIR = "tensorboard"
JSONL = "metrics.jsonl"


def run_folder(cfg) -> str:
    """``<checkpoint.storage_path>/<checkpoint.run_name>`` (a local path or an s3:// URI)."""
    return io.join(cfg.checkpoint.storage_path, cfg.checkpoint.run_name)


def kept_lines(text: str, resume_step: int) -> list[str]:
    """The lines of an existing ``metrics.jsonl`` that a run resuming at ``resume_step`` keeps: steps before it,
    and the "train" line of that step. A torn last line (a process killed mid-write) is dropped."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        if step < resume_step or (step == resume_step and rec.get("kind") == "train"):
            out.append(line)
    return out


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:  # a 0-d tensor / numpy scalar
        return float(value.item())
    return None


class MetricsLog:
    """Writer of one attempt's scalars (rank 0 only). ``log`` records a step; ``sync`` makes everything written
    so far visible at the storage path; ``close`` syncs and releases the files.

    ``run_uri``: the run folder (``run_folder``); ``s3``: the ``S3Config`` for an s3:// URI; ``resume_step``:
    the checkpoint step this attempt starts from (0 = a new run: an older ``metrics.jsonl`` is replaced)."""

    def __init__(self, run_uri: str, s3=None, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.run_uri = run_uri
        self.remote = io.is_s3(run_uri)
        self.fs, self.dest = io.get_filesystem(run_uri, s3)
        self.local = tempfile.mkdtemp(prefix="ckf_metrics_") if self.remote else self.dest
        os.makedirs(os.path.join(self.local, TB_DIR), exist_ok=True)
        jsonl_dest = io.join(self.dest, JSONL)
        old = io.read_bytes(self.fs, jsonl_dest).decode("utf-8", "replace") if io.exists(self.fs, jsonl_dest) else ""
        keep = kept_lines(old, resume_step) if resume_step > 0 else []
        path = os.path.join(self.local, JSONL)
        with open(path + ".tmp", "w") as f:  # replaced whole: a reader never sees half of it
            f.writelines(line + "\n" for line in keep)
        os.replace(path + ".tmp", path)
        self._jsonl = open(path, "a")
        self.writer = SummaryWriter(log_dir=os.path.join(self.local, TB_DIR), flush_secs=30,
                                    purge_step=resume_step + 1 if resume_step > 0 else None)
        self._closed = False

    def log(self, kind: str, step: int, scalars: dict, extra: Optional[dict] = None) -> dict:
        """One line of ``metrics.jsonl`` ({"kind", "step", "time", scalars..., extra...}) and a TensorBoard scalar
        per numeric value of ``scalars`` (tags as given; None values are skipped). Returns the line's record."""
        rec: dict = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        for tag, value in scalars.items():
            num = _number(value)
            if num is None:
                continue
            rec[tag] = num
            self.writer.add_scalar(tag, num, global_step=int(step))
        rec.update(extra or {})
        self._jsonl.write(json.dumps(rec, sort_keys=False) + "\n")
        self._jsonl.flush()
        self.writer.flush()
        return rec

    def text(self, tag: str, value: str, step: int) -> None:
        """A text entry in TensorBoard (e.g. the CF embedding version when it changes)."""
        self.writer.add_text(tag, value, global_step=int(step))

    def sync(self) -> None:
        """Flushes; for s3:// copies ``metrics.jsonl`` and this attempt's event files to the run folder (whole
        files: an upload replaces the previous copy of the same file)."""
        self.writer.flush()
        self._jsonl.flush()
        if not self.remote:
            return
        with open(os.path.join(self.local, JSONL), "rb") as f:
            io.write_bytes(self.fs, io.join(self.dest, JSONL), f.read())
        tb = os.path.join(self.local, TB_DIR)
        for name in sorted(os.listdir(tb)):
            with open(os.path.join(tb, name), "rb") as f:
                io.write_bytes(self.fs, io.join(self.dest, TB_DIR, name), f.read())

    def close(self) -> None:
        if self._closed:
            return
        self.writer.close()
        self.sync()
        self._jsonl.close()
        self._closed = True
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
