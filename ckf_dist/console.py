"""The training driver's console: its own lines, rank 0's progress, and nothing else.

By default the driver starts (or joins) Ray with ``log_to_driver=False``: what Ray Train, Ray Data, DeepSpeed
and torch print in the workers stays in Ray's log folder (``<session>/logs``: ``worker-*.out``/``.err``,
``ray-data.log``, the Train controller's logs). Rank 0 sends its progress to the driver through a
``ConsoleSink`` (a zero-CPU Ray actor) and the driver prints it: on a terminal one status line (steps, loss,
tokens/s, ETA) redrawn in place under the other lines; otherwise one line per ``training.log_every`` steps.
``python -m ckf_dist.train --verbose`` instead forwards every worker line the way Ray does by default.
"""
from __future__ import annotations

import logging
import math
import shutil
import sys
import threading
import time
from typing import Callable, Optional, TextIO


def format_duration(seconds: Optional[float]) -> str:
    """'0:07', '12:34', '1:02:03'; '?' when unknown."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(step: int, total: int, seconds: float, start_step: int, start_seconds: float,
                budget_s: float = 0.0) -> Optional[float]:
    """Seconds of training left: the remaining steps at this attempt's mean step time, capped by what is left
    of a ``training.max_minutes`` budget (``budget_s`` > 0). None before the first step of the attempt."""
    done = step - start_step
    if done <= 0:
        return None
    eta = max(total - step, 0) * (seconds - start_seconds) / done
    if budget_s > 0:
        eta = min(eta, max(budget_s - seconds, 0.0))
    return eta


def status_line(step: int, total: int, loss: Optional[float], tokens_per_s: Optional[float],
                eta_s: Optional[float], bar_width: int = 20) -> str:
    """'[#######.............] 280/800 steps  loss 0.4123  25.9k tok/s  ETA 0:57'."""
    frac = min(max(step / total, 0.0), 1.0) if total else 0.0
    filled = int(round(frac * bar_width))
    parts = [f"[{'#' * filled}{'.' * (bar_width - filled)}] {step}/{total} steps"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s / 1000:.1f}k tok/s" if tokens_per_s >= 1000 else f"{tokens_per_s:.0f} tok/s")
    parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


class Console:
    """Prints lines; on a terminal (``live``) keeps one status line at the bottom, redrawn in place."""

    def __init__(self, stream: Optional[TextIO] = None, live: Optional[bool] = None):
        self.stream = stream or sys.stdout
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self._status = ""
        self._transient = False
        self._lock = threading.Lock()

    def _clear(self) -> None:
        if self.live and self._status:
            self.stream.write("\r\x1b[2K")

    def _draw(self) -> None:
        if self.live and self._status:
            # never wider than the terminal: a wrapped status line could not be cleared with one \r
            width = shutil.get_terminal_size((120, 24)).columns - 1
            self.stream.write("\r" + self._status[: max(width, 20)])
        self.stream.flush()

    def line(self, text: str) -> None:
        with self._lock:
            self._clear()
            if self._transient:
                self._status, self._transient = "", False
            self.stream.write(text + "\n")
            self._draw()

    def status(self, text: str, transient: bool = False) -> None:
        """The live line (ignored without a terminal); a ``transient`` one goes away with the next line."""
        if not self.live:
            return
        with self._lock:
            self._clear()
            self._status, self._transient = text, transient
            self._draw()

    def handle(self, msg: dict) -> None:
        """A message from rank 0 (``WorkerProgress``): ``line`` is printed; ``step`` redraws the live line on a
        terminal, and without one prints its log line (only the ``training.log_every`` steps carry one)."""
        if msg.get("kind") == "step":
            if self.live:
                self.status(status_line(msg["step"], msg["total"], msg.get("loss"), msg.get("tokens_per_s"),
                                        msg.get("eta_s")))
            elif msg.get("text"):
                self.line(msg["text"])
        elif msg.get("text"):
            self.line(msg["text"])

    def close(self) -> None:
        """Ends the live line (it stays on screen as the last status)."""
        with self._lock:
            if self.live and self._status:
                self.stream.write("\n")
                self.stream.flush()
            self._status = ""


_active: Optional[Console] = None


def say(text: str) -> None:
    """Prints one line through the active console (above its live line), else plainly."""
    if _active is not None:
        _active.line(text)
    else:
        print(text, flush=True)


def detail(text: str) -> None:
    """A sub-step line: shown on the active console's live line (on a terminal), else not at all."""
    if _active is not None:
        _active.status(text, transient=True)


def activate(console: Optional[Console]) -> None:
    global _active
    _active = console


class ConsoleSink:
    """Holds rank 0's messages until the driver drains them (used as a Ray actor with ``num_cpus=0``)."""

    def __init__(self):
        self._messages: list = []

    def put(self, message: dict) -> None:
        self._messages.append(message)

    def drain(self) -> list:
        out, self._messages = self._messages, []
        return out


class WorkerProgress:
    """Rank 0's side: every line goes to the worker's stdout (Ray's log folder, or the console with
    ``--verbose``) and, when the driver gave a sink, to the driver; step status at most every ``interval`` s,
    always when the step carries a log line. Sends are fire-and-forget: training never waits for the driver."""

    def __init__(self, sink=None, interval: float = 0.5, prefix: str = "[rank 0] ", stream: Optional[TextIO] = None):
        self.sink = sink
        self.interval = interval
        self.prefix = prefix
        self.stream = stream
        self._last = float("-inf")

    def _write(self, text: str) -> None:
        # Not print(): Ray Train V2 patches print in workers to echo the line and also log it through the root
        # logger, so each line reached the driver twice.
        stream = self.stream or sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def _send(self, message: dict) -> None:
        if self.sink is not None:
            self.sink.put.remote(message)

    def line(self, text: str) -> None:
        text = self.prefix + text
        self._write(text)
        self._send({"kind": "line", "text": text})

    def due(self, step: int, total: int) -> bool:
        """Whether a status without a log line would be sent now (the caller then reads the loss: on a GPU
        ``loss.item()`` waits for the device, so it is not read on every step)."""
        return self.sink is not None and (step >= total or time.monotonic() - self._last >= self.interval)

    def step(self, step: int, total: int, loss: float, tokens_per_s: float, eta_s: Optional[float],
             text: Optional[str] = None) -> None:
        """Step status: written with its log line (``text``, the ``training.log_every`` steps) and sent when it
        has one or is ``due``."""
        if text is not None:
            text = self.prefix + text
            self._write(text)
        elif not self.due(step, total):
            return
        self._last = time.monotonic()
        self._send({"kind": "step", "step": step, "total": total, "loss": loss, "tokens_per_s": tokens_per_s,
                    "eta_s": eta_s, "text": text})


class SinkPump:
    """A driver thread that drains the sink every ``interval`` s into the console while training runs;
    ``on_tick(seen_any)`` is called on each round (e.g. to report a wait for GPUs until rank 0 speaks)."""

    def __init__(self, sink, console: Console, interval: float = 0.3,
                 on_tick: Optional[Callable[[bool], None]] = None):
        self.sink, self.console, self.interval, self.on_tick = sink, console, interval, on_tick
        self.seen_any = False
        self._tick_failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckf-console", daemon=True)

    def _drain(self) -> None:
        import ray

        try:
            messages = ray.get(self.sink.drain.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the console must never break training
            return
        for msg in messages:
            self.seen_any = True
            self.console.handle(msg)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()
            if self.on_tick is not None:
                try:
                    self.on_tick(self.seen_any)
                except Exception:  # noqa: BLE001 - the console must never break training; say it once, go on
                    if not self._tick_failed:
                        self._tick_failed = True
                        logging.getLogger("ckf_dist.console").warning("console tick failed", exc_info=True)

    def start(self) -> "SinkPump":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._drain()
        self.console.close()
