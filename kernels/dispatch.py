"""``impl="auto"``: which multi-LoRA implementation runs a call, decided from shapes, dtypes and a win table.

Three implementations (all give the reference's maths):

* ``"triton"``: the fused path, base GEMM in Triton with the LoRA expand in its epilogue (fewest passes, but
  only a win where the Triton GEMM keeps up with cuBLAS: a measured question);
* ``"side"``: cuBLAS for x W^T and dY W, the LoRA terms from the Triton side kernels (shrink, one dY pass,
  dA pass, in-place epilogue add). Never slower than cuBLAS by more than the LoRA passes, no host sync: the
  safe default on CUDA;
* ``"torch"``: the PyTorch reference (CPU, fp32, mixed dtypes, shapes the kernels do not take).

``choose_impl`` is a pure function of plain values (testable on a CPU-only machine). ``"triton"`` needs every
rule below *and* a row of the win table (``win_table.WIN_TABLE``, written from the benchmark's ``--json`` by
``build_win_table``) for the same GPU, dtype, d_in, d_out, padded rank and task count, measured at a token
count within 2x, where the fused path beat the side path. The table ships empty: until the GPU issue fills
it, ``auto`` never picks the fused path.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Optional, Sequence

import torch

TRITON, SIDE, TORCH = "triton", "side", "torch"
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MIN_FUSED_TOKENS = 1024     # below this the GEMM is launch/latency-bound; cuBLAS's heuristics win
MAX_TASKS = 16              # the on-device segment scan is unrolled over T + 1 offsets
MAX_RANK_TOTAL = 128        # r0 + r: the kernels pad the concatenated rank to a power of two <= 128
HIDDEN_MULTIPLE = 8         # 16-byte aligned rows for bf16/fp16 (vectorised loads, TMA later)

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def rank_pad(r0: int, r1: int) -> int:
    """The kernels' padded concatenated rank (a power of two >= 16)."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, r0 + r1)))))


def nearest_row(table: Sequence[dict], device_name: str, dtype: torch.dtype, n_rows: int, d_in: int, d_out: int,
                r0: int, r1: int, num_tasks: int) -> Optional[dict]:
    """The row nearest in token count (log scale, within 2x) among the rows measured on this GPU for this
    dtype/d_in/d_out/padded rank/task count, or None."""
    want = (device_name, dtype_name(dtype), d_in, d_out, rank_pad(r0, r1), num_tasks)
    best = None
    for row in table:
        key = (row["device"], row["dtype"], row["d_in"], row["d_out"], row["r_pad"], row["tasks"])
        if key != want or n_rows <= 0:
            continue
        dist = abs(math.log2(n_rows / row["tokens"]))
        if dist <= 1.0 and (best is None or dist < best[0]):
            best = (dist, row)
    return best[1] if best is not None else None


def table_says_fused_wins(table: Sequence[dict], *args) -> bool:
    """True when ``nearest_row(table, *args)`` says the fused path was faster than the side path."""
    row = nearest_row(table, *args)
    return row is not None and row["fused_ms"] < row["side_ms"]


def table_fuse_shrink(table: Sequence[dict], *args) -> Optional[bool]:
    """Whether the fused path should put the forward shrink in the GEMM's K loop, as measured (the faster of
    "triton fused" / "triton separate" in ``nearest_row``); None (the width rule decides) without a row."""
    row = nearest_row(table, *args)
    return None if row is None or "fuse_shrink" not in row else bool(row["fuse_shrink"])


def choose_impl(device_type: str, x_dtype: torch.dtype, w_dtype: torch.dtype, n_rows: int, d_in: int, d_out: int,
                r0: int, r1: int, num_tasks: int, device_name: str = "", table: Optional[Sequence[dict]] = None,
                ) -> tuple[str, str]:
    """(impl, reason) for one call; every input is a plain value known on the host (no device read).

    ``r0``/``r1``: shared/task rank (0 = absent); ``num_tasks``: T of the stacked task adapters (0 if none);
    ``table``: win-table rows (default: the shipped ``WIN_TABLE``)."""
    if device_type != "cuda":
        return TORCH, f"{device_type} tensors: the Triton kernels need CUDA"
    if x_dtype != w_dtype:
        return TORCH, f"x is {dtype_name(x_dtype)} but W is {dtype_name(w_dtype)}"
    if x_dtype not in KERNEL_DTYPES:
        return TORCH, f"{dtype_name(x_dtype)}: the kernels are tuned for bf16/fp16 only"
    if r0 + r1 == 0:
        return TORCH, "no adapter on this layer (plain linear)"
    if r0 + r1 > MAX_RANK_TOTAL:
        return TORCH, f"rank r0 + r = {r0 + r1} > {MAX_RANK_TOTAL}"
    if num_tasks > MAX_TASKS:
        return TORCH, f"{num_tasks} tasks > {MAX_TASKS}"
    if d_in % HIDDEN_MULTIPLE or d_out % HIDDEN_MULTIPLE:
        return SIDE, f"d_in {d_in} / d_out {d_out} not multiples of {HIDDEN_MULTIPLE}"
    if n_rows < MIN_FUSED_TOKENS:
        return SIDE, f"{n_rows} tokens < {MIN_FUSED_TOKENS}"
    if table is None:
        from .win_table import WIN_TABLE
        table = WIN_TABLE
    if not table_says_fused_wins(table, device_name, x_dtype, n_rows, d_in, d_out, r0, r1, num_tasks):
        return SIDE, "no measured win of the fused path for this GPU and shape"
    return TRITON, "the win table says the fused path beats cuBLAS + side kernels here"


def build_win_table(bench_rows: Iterable[dict]) -> list[dict]:
    """Win-table rows from the benchmark's ``--json`` rows (``bench_multi_lora``): one row per (device, dtype,
    shape) that timed both the fused path (``triton fused``/``triton separate``, the faster, recorded as
    ``fuse_shrink``) and the side path, with the two medians. Rows lacking either timing are skipped."""
    by_shape: dict[tuple, dict] = {}
    for row in bench_rows:
        key = (row["device"], row["dtype"], row["tokens"], row["d_in"], row["d_out"], row["r_pad"], row["tasks"])
        by_shape.setdefault(key, {})[row["method"]] = row["median_ms"]
    table = []
    for (device, dtype, tokens, d_in, d_out, r_pad, tasks), ms in sorted(by_shape.items()):
        fused = {m == "triton fused": ms[m] for m in ("triton fused", "triton separate") if ms.get(m) is not None}
        if not fused or ms.get("triton side") is None:
            continue
        fuse_shrink = min(fused, key=fused.get)
        table.append(dict(device=device, dtype=dtype, tokens=tokens, d_in=d_in, d_out=d_out, r_pad=r_pad,
                          tasks=tasks, fused_ms=fused[fuse_shrink], side_ms=ms["triton side"],
                          fuse_shrink=fuse_shrink))
    return table


def write_win_table(bench_json_path: str, out_path: str) -> list[dict]:
    """Reads the benchmark's ``--json`` file and writes ``win_table.py`` (a Python literal, so it ships inside
    the package without package-data rules). Returns the table."""
    with open(bench_json_path) as f:
        data = json.load(f)
    table = build_win_table(data["rows"])
    meta = {k: data.get(k) for k in ("gpu", "torch", "triton", "date")}
    body = ",\n".join("    " + repr(dict(sorted(row.items()))) for row in table)  # a Python literal
    with open(out_path, "w") as f:
        f.write('"""Measured win table of ``impl="auto"`` (written by ``dispatch.write_win_table`` from\n'
                f'``bench_multi_lora --json``; {json.dumps(meta, sort_keys=True)}). Do not edit by hand."""\n'
                "WIN_TABLE = [\n" + (body + ",\n" if body else "") + "]\n")
    return table
