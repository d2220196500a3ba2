"""The worker's side of ``python -m ckf_dist.profile``: section timers inside the real training loop.

``ckf_dist.worker.train_loop_per_worker`` wraps each part of a step in ``timer.section(name)`` (data wait,
forward, backward, optimizer, CF pickup, checkpoint). With ``profile.enabled`` off (a training run) a section
is a no-op context. With it on, the steps of the run are, in order: ``profile.warmup_steps`` untimed,
``profile.steps`` measured (the CUDA stream is synchronised at every section boundary so that each section
owns its kernels; one checkpoint is written at the second-to-last measured step), ``profile.trace_steps``
recorded by ``torch.profiler`` on rank 0 (after the measured ones: the profiler's own overhead never enters
the timings). At the end every rank's timings are gathered (a collective) and rank 0 writes them, and the
trace, to ``<run folder>/profile/`` where the driver (``ckf_dist.profile``) reads them back.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
import time

import torch

SECTIONS = ("data_wait", "cf_pickup", "forward", "backward", "optimizer", "checkpoint")
PROFILE_DIR = "profile"
TIMINGS_FILE = "timings.json"
TRACE_FILE = "trace.json"


class StepTimer:
    """Per-section wall time of the measured steps (see the module docstring). Steps are numbered as the
    worker's ``step`` before its increment: step s is measured when warmup <= s < warmup + steps."""

    def __init__(self, enabled: bool, device: torch.device, warmup: int = 0, steps: int = 0, trace_steps: int = 0,
                 trace: bool = False):
        self.enabled = enabled
        self.device = device
        self.warmup, self.steps, self.trace_steps = warmup, steps, trace_steps
        self.trace = trace and trace_steps > 0
        self.records: list[dict] = []  # one per measured step: section seconds, "step_s", counts
        self.current: dict | None = None
        self.prof = None
        self.trace_path = None
        self.peak_memory = None

    @classmethod
    def from_config(cls, cfg, device: torch.device, rank: int) -> "StepTimer":
        p = cfg.profile
        return cls(p.enabled, device, p.warmup_steps, p.steps, p.trace_steps, trace=rank == 0)

    def total_steps(self) -> int:
        return self.warmup + self.steps + self.trace_steps

    def checkpoint_step(self) -> int:
        """The step (after its increment, as the worker's checkpoint cadence counts) whose checkpoint is timed:
        the second-to-last measured one."""
        return self.warmup + self.steps - 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start_step(self, step: int) -> None:
        """Called at the top of every loop iteration with the step about to run."""
        if not self.enabled:
            return
        if step == self.warmup:
            self._sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        if step == self.warmup + self.steps:
            self.peak_memory = peak_memory(self.device)
            if self.trace:
                self._start_trace()
        measured = self.warmup <= step < self.warmup + self.steps
        self.current = {s: 0.0 for s in SECTIONS} if measured else None
        if self.current is not None:
            self.current["_t0"] = time.perf_counter()

    @contextlib.contextmanager
    def section(self, name: str):
        """Times the body into section ``name`` of a measured step (and labels it in the trace)."""
        if not self.enabled:
            yield
            return
        label = torch.profiler.record_function(name) if self.prof is not None else contextlib.nullcontext()
        with label:
            t = time.perf_counter()
            try:
                yield
            finally:
                self._sync()
                if self.current is not None:
                    self.current[name] += time.perf_counter() - t

    def count(self, counts_fn) -> None:
        """Records the batch counts of a measured step (``counts_fn()`` -> dict; only called when measured)."""
        if self.current is not None:
            self.current.update(counts_fn())

    def end_step(self) -> None:
        """Called after the step's checkpoint (if any): closes the measured step."""
        if self.current is None:
            return
        self._sync()
        rec = self.current
        rec["step_s"] = time.perf_counter() - rec.pop("_t0")
        self.records.append(rec)
        self.current = None

    def _start_trace(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=False)
        self.prof.start()

    def finish(self, rank: int, world: int, extra: dict, folder: str, s3_config) -> None:
        """Stops the trace, gathers every rank's timings (a collective: every rank calls it) and, on rank 0,
        writes ``timings.json`` (and ``trace.json``) into ``folder`` (local or s3://)."""
        import torch.distributed as dist

        from ckf_dist.data import io

        if not self.enabled:
            return
        if self.peak_memory is None:
            self.peak_memory = peak_memory(self.device)
        trace_bytes = None
        if self.prof is not None:
            self._sync()
            self.prof.stop()
            with tempfile.TemporaryDirectory(prefix="ckf_trace_") as tmp:
                path = os.path.join(tmp, TRACE_FILE)
                self.prof.export_chrome_trace(path)
                with open(path, "rb") as f:
                    trace_bytes = f.read()
            self.prof = None
        mine = {"rank": rank, "steps": self.records, "peak_memory_bytes": self.peak_memory[0],
                "peak_memory_kind": self.peak_memory[1], **extra}
        gathered = [None] * world
        if dist.is_initialized() and world > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if rank != 0:
            return
        fs, root = io.get_filesystem(folder, s3_config)
        io.write_bytes(fs, io.join(root, TIMINGS_FILE), json.dumps({"workers": gathered}).encode("utf-8"))
        if trace_bytes is not None:
            io.write_bytes(fs, io.join(root, TRACE_FILE), trace_bytes)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they measure): CUDA ``max_memory_allocated`` since the measured window began, else the
    process's maximum resident set size (Linux reports ru_maxrss in KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


def device_info(device: torch.device, dtype: torch.dtype, peak_tflops: float) -> dict:
    """The device's name and its peak TFLOP/s for the MFU: ``peak_tflops`` when set, else the bf16 table
    (``ckf_dist.flops.PEAK_TFLOPS_BF16``) for a listed GPU in bf16, else a matmul probe on this worker."""
    from ckf_dist.flops import matmul_probe_tflops, table_peak_tflops

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    if peak_tflops > 0:
        return {"device": name, "peak_tflops": peak_tflops, "peak_source": "profile.peak_tflops"}
    table = table_peak_tflops(name) if device.type == "cuda" and dtype == torch.bfloat16 else None
    if table is not None:
        return {"device": name, "peak_tflops": table, "peak_source": "table (bf16 dense)"}
    probe = matmul_probe_tflops(device, dtype)
    return {"device": name, "peak_tflops": probe, "peak_source": f"measured matmul probe ({str(dtype)[6:]})"}
