"""Fused Triton kernels for the batched multi-task LoRA linear (shared adapter 0 + one adapter per task).

Maths (rows sorted by task, segment t = rows ``seg_offsets[t]:seg_offsets[t+1]``, ``x_l`` = LoRA input)::

    y = x W^T + b + s0 * (x_l A_0^T) B_0^T + s * (x_l A_t^T) B_t^T

Design (Liger-Kernel style: jit kernel -> host launcher -> autograd.Function -> module):

* **Concatenated rank.** For a row of task t the shared and the task adapter are one LoRA of rank
  ``R = r0 + r``: ``h = x_l [A_0; A_t]^T`` (``[N, R]``) and ``y += h diag(s0.., s..) [B_0, B_t]^T``. Every kernel
  works on that concatenated rank dimension (padded to ``R_PAD``, a power of two >= 16 for ``tl.dot``), so the
  two adapters cost one shrink and one expand instead of two each. The pieces are read straight from the
  parameters (no concatenated copy is materialised): rank index ``j < r0`` reads adapter 0, ``j >= r0`` task t.
* **Task-aligned row tiles.** A row tile never straddles two segments: program ``m`` is mapped on device to
  (task, first row) by scanning the ``T + 1`` offsets (T <= 16, unrolled). The grid is sized by the upper bound
  ``cdiv(N, BLOCK_M) + T`` (known from shapes), surplus programs return at once, so ``seg_offsets`` never
  has to be read on the host: no device->host sync in the hot path. Empty segments own no tile.
* **One GEMM per direction.** ``_multi_lora_gemm_kernel`` computes ``out = in @ Wt + lora`` with the LoRA
  expand in the epilogue: ``y = x W^T + (s h) B_cat^T + b`` forward, ``dX = dY W + (s g) A_cat`` backward (the
  roles of A and B swap, only strides change). ``base="cublas"`` (the side path) runs the same kernel without
  its K loop (``ACCUMULATE``) to add the LoRA term in place to cuBLAS's result. The forward shrink is either
  accumulated in the K loop from the x tile already in registers (narrow outputs only, ``FUSE_MAX_WIDTH``) or
  done by the bandwidth-bound ``_shrink_kernel`` (one pass over x).
* **One pass over dY** (``_dy_pass_kernel``): ``g = dY B_cat`` and ``dB_t = s dY_seg^T h_seg`` from one load of
  each dY tile; then ``dA_t = s g_seg^T x_seg`` (``_seg_outer_kernel``, one pass over x). One program per (row
  chunk of one task, column tile); relaxed fp32 atomics; the chunk is a runtime argument.
* **LoRA dropout** is a Philox keep mask regenerated from (seed, p) in the shrink, the dX epilogue and the dA
  pass (``_dropout_keep``): no dropped copy of x, no separate d(lora_x).

See kernels/README.md for the cost model in passes and what awaits a GPU.

The base weight is treated as frozen (the kernels never form dW); if it does require grad, dW (and db)
are computed with plain torch ops as a correctness fallback.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import check_segment_offsets

# The interpreter (CPU tests) is decided when ``@triton.jit`` runs, i.e. at import of this module.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Autotuning benchmarks configs on the device (on by default on the GPU; CKF_LORA_AUTOTUNE=0 switches it off).
# Under the interpreter it is off unless CKF_LORA_AUTOTUNE=1: then two tiny configs and a do_bench that runs
# each once exercise the autotuned launcher (key, grid, restore_value) on a CPU.
_AUTOTUNE = os.environ.get("CKF_LORA_AUTOTUNE", "0" if _INTERPRET else "1") != "0"

MAX_TASKS = 16
MAX_RANK = 64
# Tests set this to True: every buffer a kernel is meant to write in full is then allocated filled with NaN
# instead of left uninitialised, so a tile the kernels forget to write shows up as NaN in the result.
POISON_OUTPUTS = False


# None: one program per output tile. An int: a persistent grid of that many programs walking the tiles (the
# benchmark times both: set it to a multiple of the SM count; tests set a small number to exercise the loop).
PERSISTENT_PROGRAMS: Optional[int] = None
TILE_BLOCKS = (16, 32, 64, 128)  # row-block sizes a tile list covers (every BLOCK_M the GEMM configs use)
# Opt-in: the base GEMM loads its x and W tiles through device-side TMA tensor descriptors
# (``tl.make_tensor_descriptor``) instead of masked pointer loads; CKF_LORA_TMA=1 or ``tma=True`` per call.
USE_TMA = os.environ.get("CKF_LORA_TMA", "0") == "1"


def build_tile_list(seg_offsets: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The batch's row-tile list for the GEMM, built once per batch (``TaskSegments``) instead of every program
    scanning the T + 1 offsets: int32 ``[len(TILE_BLOCKS), 2, cdiv(n_rows, 16) + T]``; for block size
    ``TILE_BLOCKS[b]``, entry ``[b, 0, i]`` is the task of row tile i (-1 past the last tile) and ``[b, 1, i]`` its
    first row. Tiles never cross a segment; tile ids run task by task (the order of the offset scan). Torch ops
    on the offsets' device only: no host sync."""
    seg = seg_offsets.to(torch.int64)
    num_tasks = seg.numel() - 1
    max_tiles = -(-n_rows // TILE_BLOCKS[0]) + num_tasks
    lens = seg[1:] - seg[:-1]
    ids = torch.arange(max_tiles, device=seg.device)
    out = torch.empty(len(TILE_BLOCKS), 2, max_tiles, dtype=torch.int32, device=seg.device)
    for b, block in enumerate(TILE_BLOCKS):
        n_tiles = (lens + block - 1) // block                          # [T]
        ends = torch.cumsum(n_tiles, 0)                                # [T] exclusive end tile id of each task
        task = torch.searchsorted(ends, ids, right=True)               # [max_tiles] in [0, T]
        valid = task < num_tasks
        tc = task.clamp(max=num_tasks - 1)
        row_start = seg[tc] + (ids - (ends[tc] - n_tiles[tc])) * block
        out[b, 0] = torch.where(valid, task, -1).to(torch.int32)
        out[b, 1] = torch.where(valid, row_start, 0).to(torch.int32)
    return out


def _empty(*shape, dtype, device):
    """torch.empty, or a NaN-filled buffer when ``POISON_OUTPUTS`` (tests)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_tile(pid_m, seg_ptr, n_rows, NUM_TASKS: tl.constexpr, HAS_TASK: tl.constexpr, BLOCK):
    """Maps row-tile id ``pid_m`` to (task, row_start, row_end) with tiles never crossing a segment.

    Tiles are numbered task by task: task t owns ``cdiv(len_t, BLOCK)`` consecutive ids. ``task == -1`` marks a
    surplus program (the grid is sized by the bound ``cdiv(N, BLOCK) + T``). Without task adapters the rows
    are one segment [0, n_rows). ``BLOCK`` may be a runtime value (the reductions' row chunk).
    """
    if HAS_TASK:
        task = pid_m * 0 - 1
        row_start = pid_m * 0
        row_end = pid_m * 0
        first_tile = pid_m * 0
        for t in tl.static_range(NUM_TASKS):
            lo = tl.load(seg_ptr + t).to(tl.int32)
            hi = tl.load(seg_ptr + t + 1).to(tl.int32)
            n_tiles = tl.cdiv(hi - lo, BLOCK)
            inside = (pid_m >= first_tile) & (pid_m < first_tile + n_tiles)
            task = tl.where(inside, t, task)
            row_start = tl.where(inside, lo + (pid_m - first_tile) * BLOCK, row_start)
            row_end = tl.where(inside, hi, row_end)
            first_tile += n_tiles
    else:
        row_start = pid_m * BLOCK
        row_end = pid_m * 0 + n_rows
        task = tl.where(row_start < n_rows, 0, -1)
    return task, row_start, row_end


@triton.jit
def _load_cat(shared_ptr, s_sj, s_so, task_ptr, t_sj, t_so, j, o, o_mask,
              R0: tl.constexpr, R1: tl.constexpr, J_FIRST: tl.constexpr):
    """Loads a tile of the concatenated-rank matrix ``[M_0; M_t]`` (rank index j, other index o) as fp32.

    ``shared_ptr`` / ``task_ptr`` (already offset to task t) hold the two pieces; ``j < R0`` reads the shared
    piece, ``R0 <= j < R0 + R1`` the task piece (row ``j - R0``), higher j (padding) reads 0.
    Returns ``[len(j), len(o)]`` if J_FIRST else ``[len(o), len(j)]``.
    """
    if J_FIRST:
        jj = j[:, None]
        oo = o[None, :]
        om = o_mask[None, :]
    else:
        jj = j[None, :]
        oo = o[:, None]
        om = o_mask[:, None]
    val = tl.zeros_like(jj + oo).to(tl.float32)
    if R0 > 0:
        val += tl.load(shared_ptr + jj * s_sj + oo * s_so, mask=(jj < R0) & om, other=0.0).to(tl.float32)
    if R1 > 0:
        jt = jj - R0
        val += tl.load(task_ptr + jt * t_sj + oo * t_so, mask=(jj >= R0) & (jj < R0 + R1) & om,
                       other=0.0).to(tl.float32)
    return val


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, rows64, col0, width, p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """LoRA-dropout keep mask of the tile rows ``rows64`` x columns ``col0 + [0, BLOCK_C)`` (``col0`` a multiple
    of 4): ``uniform >= p`` from Philox-4x32 keyed by ``seed``.

    One Philox call yields 4 uniforms, used for 4 adjacent columns: the counter of element (row, col) is
    ``row * ceil(width / 4) + col // 4`` (split into two 32-bit words: 32-bit arithmetic, no overflow for any
    N * width < 2**64) and ``col % 4`` picks the output. The counter is the element's logical position in the
    [N, width] LoRA input (never its address), so the shrink (forward), the dX epilogue and the dA pass
    (backward) regenerate the same mask from (seed, p) alone, with their different tile shapes, and
    ``dropout_keep_mask`` reproduces it for the reference.
    """
    q = col0 // 4 + tl.arange(0, BLOCK_C // 4)
    offs = rows64[:, None] * ((width + 3) // 4) + q[None, :]  # int64 [BLOCK_R, BLOCK_C / 4]
    c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
    c1 = (offs >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # join(join(r0, r2), join(r1, r3))[m, q, i, j] = r_{2i + j}: reshaped row-major, column 4q + k gets r_k.
    u = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_R, BLOCK_C))
    return tl.uint_to_uniform_float(u) >= p


@triton.jit
def _listed_tile(pid_m, tiles_ptr, max_tiles, seg_ptr, BLOCK: tl.constexpr):
    """(task, row_start, row_end) of row tile ``pid_m`` from the batch's tile list (``build_tile_list``):
    ``tiles[b, 0, i]`` = task (-1: surplus id), ``tiles[b, 1, i]`` = first row, for row-block size
    ``TILE_BLOCKS[b]`` (16, 32, 64, 128)."""
    b = (BLOCK == 32) * 1 + (BLOCK == 64) * 2 + (BLOCK == 128) * 3
    task = tl.load(tiles_ptr + (2 * b) * max_tiles + pid_m)
    row_start = tl.load(tiles_ptr + (2 * b + 1) * max_tiles + pid_m)
    row_end = tl.load(seg_ptr + tl.maximum(task, 0) + 1).to(tl.int32)
    return task, row_start, row_end


@triton.jit
def _gemm_tile(
    pid, tiles_ptr, max_tiles, x_ptr, w_ptr, x_desc, w_desc, bias_ptr, out_ptr, out2_ptr, h_ptr, seg_ptr,
    # shrink operand S[j, k] (only read with FUSE_SHRINK): shared piece, task piece
    ss_ptr, ss_sj, ss_sk, st_ptr, st_st, st_sj, st_sk,
    # expand operand E[j, c]: shared piece, task piece
    es_ptr, es_sj, es_sc, et_ptr, et_st, et_sj, et_sc,
    n_rows, K, C,
    stride_xm, stride_xk, stride_wk, stride_wc, stride_om, stride_oc, stride_o2m, stride_o2c,
    stride_hm, stride_hj,
    shared_scale, task_scale, drop_seed, drop_p, n_bucket,
    NUM_TASKS: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, STORE_H: tl.constexpr, SPLIT_OUT: tl.constexpr,
    ACCUMULATE: tl.constexpr, EPI_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TILES: tl.constexpr, TMA: tl.constexpr, W_K_CONTIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (row tile, column tile) of ``out[n, c] = sum_k x[n, k] Wt[k, c] + sum_j (scale_j h[n, j]) E_t[j, c] (+ bias[c])``.

    Shapes: x [N, K]; Wt [K, C] (given by strides: W^T in the forward, W in the backward); h [N, R_PAD]
    (written here when FUSE_SHRINK and STORE_H, read otherwise; fp32 or the activation dtype); out (and out2)
    [N, C]; E_t = [E_0; E_t] [R0 + R1, C]. SPLIT_OUT writes the LoRA term to out2 instead of adding it
    (backward with a separate ``lora_x``). ACCUMULATE skips the K loop and adds the LoRA term to ``out`` in
    place (the "side" path: ``out`` already holds cuBLAS's x W^T + b). EPI_DROPOUT multiplies the LoRA term by
    the dropout keep mask / (1 - p) (backward: d x_l -> d x through the dropout). ``n_bucket`` is unused by the
    kernel: it only separates token-count buckets in the autotuner's key.
    TMA: the x and Wt tiles come from the tensor descriptors ``x_desc`` ([N, K] box [BLOCK_M, BLOCK_K]) and
    ``w_desc`` (W_K_CONTIG: W stored [C, K] (forward, x W^T), box [BLOCK_N, BLOCK_K], transposed after the
    load; else W stored [K, C] (backward, dY W), box [BLOCK_K, BLOCK_N]); the descriptor zero-fills reads past
    N, K and C. Rows of the next segment inside the box are computed and dropped by the masked store.
    """
    dt = x_ptr.dtype.element_ty

    # Grouped ordering: GROUP_M consecutive row tiles sweep the column tiles together, so the W column
    # panel stays in L2 while it is reused (and the rows of one task, and so its adapter, stay together).
    num_tiles_m = tl.cdiv(n_rows, BLOCK_M) + (NUM_TASKS if R1 > 0 else 0)  # same bound as the host grid
    num_pid_n = tl.cdiv(C, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_tiles_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    if USE_TILES:
        task, row_start, row_end = _listed_tile(pid_m, tiles_ptr, max_tiles, seg_ptr, BLOCK_M)
    else:
        task, row_start, row_end = _segment_tile(pid_m, seg_ptr, n_rows, NUM_TASKS, R1 > 0, BLOCK_M)
    if task >= 0:  # surplus tile ids (the grid is sized by a bound) do nothing
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)  # N * d can exceed 2**31
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < C
        offs_k = tl.arange(0, BLOCK_K)
        offs_j = tl.arange(0, R_PAD)
        out_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_oc
        out_mask = row_mask[:, None] & col_mask[None, :]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        if ACCUMULATE:
            if not SPLIT_OUT:
                acc = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        else:
            st_task_ptr = st_ptr + task * st_st
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                k_mask = k < K
                if TMA:
                    xt = x_desc.load([row_start, k0])
                    if W_K_CONTIG:
                        wt = tl.trans(w_desc.load([pid_n * BLOCK_N, k0])).to(dt)
                    else:
                        wt = w_desc.load([k0, pid_n * BLOCK_N]).to(dt)
                else:
                    xt = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :] * stride_xk,
                                 mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    wt = tl.load(w_ptr + k[:, None] * stride_wk + cols[None, :] * stride_wc,
                                 mask=k_mask[:, None] & col_mask[None, :], other=0.0).to(dt)
                acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
                if FUSE_SHRINK:
                    # The x tile is already in registers: the shrink costs R_PAD extra MMA columns, no extra load of x.
                    s_tile = _load_cat(ss_ptr, ss_sj, ss_sk, st_task_ptr, st_sj, st_sk, offs_j, k, k_mask, R0, R1,
                                       False)
                    h = tl.dot(xt, s_tile.to(dt), h, input_precision=INPUT_PRECISION)

        h_mask = row_mask[:, None] & (offs_j[None, :] < R_PAD)
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + offs_j[None, :] * stride_hj
        if R0 + R1 > 0:  # any adapter on this layer
            if FUSE_SHRINK:
                # Round like the reference (h is materialised in the activation dtype there too).
                h = h.to(dt).to(tl.float32)
                if STORE_H:
                    # Every column tile computed the same h; one of them keeps it for the backward.
                    if pid_n == 0:
                        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=h_mask)
            else:
                h = tl.load(h_ptrs, mask=h_mask, other=0.0).to(tl.float32)
            scale = tl.where(offs_j < R0, shared_scale, task_scale)
            hs = (h * scale[None, :]).to(dt)
            e_tile = _load_cat(es_ptr, es_sj, es_sc, et_ptr + task * et_st, et_sj, et_sc, offs_j, cols, col_mask,
                               R0, R1, True)
            lora = tl.dot(hs, e_tile.to(dt), input_precision=INPUT_PRECISION)
            if EPI_DROPOUT:
                keep = _dropout_keep(drop_seed, rows64, pid_n * BLOCK_N, C, drop_p, BLOCK_M, BLOCK_N)
                lora = tl.where(keep, lora * (1.0 / (1.0 - drop_p)), 0.0)
            if SPLIT_OUT:
                tl.store(out2_ptr + rows64[:, None] * stride_o2m + cols[None, :] * stride_o2c,
                         lora.to(out2_ptr.dtype.element_ty), mask=out_mask)
            else:
                acc += lora
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if not (ACCUMULATE and SPLIT_OUT):  # accumulate + split: out already final (cuBLAS), nothing to add
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _multi_lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, out2_ptr, h_ptr, seg_ptr, tiles_ptr,
    ss_ptr, ss_sj, ss_sk, st_ptr, st_st, st_sj, st_sk,
    es_ptr, es_sj, es_sc, et_ptr, et_st, et_sj, et_sc,
    n_rows, K, C, max_tiles, num_progs,
    stride_xm, stride_xk, stride_wk, stride_wc, stride_om, stride_oc, stride_o2m, stride_o2c,
    stride_hm, stride_hj,
    shared_scale, task_scale, drop_seed, drop_p, n_bucket,
    NUM_TASKS: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, STORE_H: tl.constexpr, SPLIT_OUT: tl.constexpr,
    ACCUMULATE: tl.constexpr, EPI_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TILES: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr, W_K_CONTIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The multi-LoRA GEMM (see ``_gemm_tile``). One program per output tile, or, with PERSISTENT, ``num_progs``
    programs each walking the tile ids ``pid, pid + num_progs, ...`` (a persistent grid: no tail wave of
    surplus programs, tiles of one task adjacent). USE_TILES: (task, row start) of a row tile come from the
    batch's tile list (``tiles_ptr``, built once per batch by ``build_tile_list``) instead of a scan of the
    T + 1 offsets. TMA: the descriptors of x and W are built once per program (see ``_gemm_tile``)."""
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[n_rows, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if W_K_CONTIG:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C, K], strides=[stride_wc, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, C], strides=[stride_wk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
    else:
        x_desc = x_ptr
        w_desc = w_ptr
    num_tiles = (tl.cdiv(n_rows, BLOCK_M) + (NUM_TASKS if R1 > 0 else 0)) * tl.cdiv(C, BLOCK_N)
    if PERSISTENT:
        for tile_id in range(tl.program_id(0), num_tiles, num_progs):
            _gemm_tile(tile_id, tiles_ptr, max_tiles, x_ptr, w_ptr, x_desc, w_desc, bias_ptr, out_ptr, out2_ptr,
                       h_ptr, seg_ptr,
                       ss_ptr, ss_sj, ss_sk, st_ptr, st_st, st_sj, st_sk,
                       es_ptr, es_sj, es_sc, et_ptr, et_st, et_sj, et_sc, n_rows, K, C,
                       stride_xm, stride_xk, stride_wk, stride_wc, stride_om, stride_oc, stride_o2m, stride_o2c,
                       stride_hm, stride_hj, shared_scale, task_scale, drop_seed, drop_p, n_bucket,
                       NUM_TASKS, R0, R1, R_PAD, HAS_BIAS, FUSE_SHRINK, STORE_H, SPLIT_OUT, ACCUMULATE, EPI_DROPOUT,
                       INPUT_PRECISION, USE_TILES, TMA, W_K_CONTIG, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _gemm_tile(tl.program_id(0), tiles_ptr, max_tiles, x_ptr, w_ptr, x_desc, w_desc, bias_ptr, out_ptr,
                   out2_ptr, h_ptr, seg_ptr,
                   ss_ptr, ss_sj, ss_sk, st_ptr, st_st, st_sj, st_sk,
                   es_ptr, es_sj, es_sc, et_ptr, et_st, et_sj, et_sc, n_rows, K, C,
                   stride_xm, stride_xk, stride_wk, stride_wc, stride_om, stride_oc, stride_o2m, stride_o2c,
                   stride_hm, stride_hj, shared_scale, task_scale, drop_seed, drop_p, n_bucket,
                   NUM_TASKS, R0, R1, R_PAD, HAS_BIAS, FUSE_SHRINK, STORE_H, SPLIT_OUT, ACCUMULATE, EPI_DROPOUT,
                   INPUT_PRECISION, USE_TILES, TMA, W_K_CONTIG, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _shrink_kernel(
    x_ptr, h_ptr, seg_ptr,
    ss_ptr, ss_sj, ss_sk, st_ptr, st_st, st_sj, st_sk,
    n_rows, K,
    stride_xm, stride_xk, stride_hm, stride_hj, drop_seed, drop_p,
    NUM_TASKS: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``h[n, :] = x_l[n, :] @ S_t^T`` for the task t of row n; x [N, K], S_t = [S_0; S_t] [R0 + R1, K], h [N, R_PAD].

    Bandwidth-bound (one pass over x); used when the shrink input differs from the GEMM input (``lora_x`` or
    dropout) or when fusing it into a wide GEMM would cost more MMA work than this extra pass. DROPOUT:
    ``x_l = x * keep / (1 - p)`` with the Philox keep mask generated on the fly (no dropped copy of x).
    """
    dt = x_ptr.dtype.element_ty
    task, row_start, row_end = _segment_tile(tl.program_id(0), seg_ptr, n_rows, NUM_TASKS, R1 > 0, BLOCK_M)
    if task < 0:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, R_PAD)
    st_task_ptr = st_ptr + task * st_st
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :] * stride_xk,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if DROPOUT:
            keep = _dropout_keep(drop_seed, rows64, k0, K, drop_p, BLOCK_M, BLOCK_K)
            xt = tl.where(keep, xt.to(tl.float32) * (1.0 / (1.0 - drop_p)), 0.0).to(dt)
        s_tile = _load_cat(ss_ptr, ss_sj, ss_sk, st_task_ptr, st_sj, st_sk, offs_j, k, k_mask, R0, R1, False)
        h = tl.dot(xt, s_tile.to(dt), h, input_precision=INPUT_PRECISION)
    tl.store(h_ptr + rows64[:, None] * stride_hm + offs_j[None, :] * stride_hj, h.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None])


@triton.jit
def _atomic_add_cat(os_ptr, ot_ptr, task, cols, col_mask, offs_j, acc, os_sc, os_sj, ot_st, ot_sc, ot_sj,
                    R0: tl.constexpr, R1: tl.constexpr):
    """Adds ``acc [len(cols), R_PAD]`` (concatenated rank) into the shared [C, R0] / task [T, C, R1] fp32 buffers.

    Relaxed atomics: the sums need atomicity, not ordering with other memory operations (no fence per add)."""
    jj = offs_j[None, :]
    if R0 > 0:
        tl.atomic_add(os_ptr + cols[:, None] * os_sc + jj * os_sj, acc,
                      mask=col_mask[:, None] & (jj < R0), sem="relaxed")
    if R1 > 0:
        tl.atomic_add(ot_ptr + task * ot_st + cols[:, None] * ot_sc + (jj - R0) * ot_sj, acc,
                      mask=col_mask[:, None] & (jj >= R0) & (jj < R0 + R1), sem="relaxed")


@triton.jit
def _dy_pass_kernel(
    dy_ptr, h_ptr, keep_ptr, seg_ptr, g_ptr, os_ptr, ot_ptr,
    # B operand B_cat[c, j]: shared piece [C, R0], task piece [T, C, R1]
    bs_ptr, bs_sj, bs_sc, bt_ptr, bt_st, bt_sj, bt_sc,
    n_rows, C, chunk,
    stride_dm, stride_dc, stride_hm, stride_hj, stride_gm, stride_gj,
    os_sc, os_sj, ot_st, ot_sc, ot_sj,
    shared_scale, task_scale,
    NUM_TASKS: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R_PAD: tl.constexpr,
    DO_G: tl.constexpr, DO_DB: tl.constexpr, HAS_KEEP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One pass over dY for both rank-sized backward products of a task segment:

    * ``g[n, :] += dY[n, cols] B_cat[cols, :]`` (fp32 atomics: the column tiles of a row add up), and
    * ``dB_t[cols, j] += s_j sum_n dY[n, cols] h[n, j] keep[n]`` (fp32 atomics over row chunks).

    One program = one row chunk (``chunk`` rows, a runtime value: a new token count does not recompile) of one
    task x BLOCK_C columns; the dY tile is loaded once and feeds both dots.
    """
    dt = dy_ptr.dtype.element_ty
    task, row_start, seg_end = _segment_tile(tl.program_id(0), seg_ptr, n_rows, NUM_TASKS, R1 > 0, chunk)
    if task < 0:
        return
    row_end = tl.minimum(seg_end, row_start + chunk)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    offs_l = tl.arange(0, BLOCK_L)
    offs_j = tl.arange(0, R_PAD)
    b_tile = _load_cat(bs_ptr, bs_sj, bs_sc, bt_ptr + task * bt_st, bt_sj, bt_sc, offs_j, cols, col_mask,
                       R0, R1, False).to(dt)  # [BLOCK_C, R_PAD]
    acc = tl.zeros((BLOCK_C, R_PAD), dtype=tl.float32)
    for i in range(0, tl.cdiv(row_end - row_start, BLOCK_L)):
        rows = row_start + i * BLOCK_L + offs_l
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        dyt = tl.load(dy_ptr + rows64[:, None] * stride_dm + cols[None, :] * stride_dc,
                      mask=row_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_L, BLOCK_C]
        if DO_G:
            gp = tl.dot(dyt, b_tile, input_precision=INPUT_PRECISION)  # [BLOCK_L, R_PAD]
            tl.atomic_add(g_ptr + rows64[:, None] * stride_gm + offs_j[None, :] * stride_gj, gp,
                          mask=row_mask[:, None], sem="relaxed")
        if DO_DB:
            ht = tl.load(h_ptr + rows64[:, None] * stride_hm + offs_j[None, :] * stride_hj,
                         mask=row_mask[:, None], other=0.0)
            if HAS_KEEP:  # gradient routing: rows that must not train the adapters add nothing to dB
                kp = tl.load(keep_ptr + rows64, mask=row_mask, other=0)
                ht = tl.where(kp[:, None] != 0, ht, 0.0)
            acc = tl.dot(tl.trans(dyt), ht.to(dt), acc, input_precision=INPUT_PRECISION)
    if DO_DB:
        scale = tl.where(offs_j < R0, shared_scale, task_scale)
        _atomic_add_cat(os_ptr, ot_ptr, task, cols, col_mask, offs_j, acc * scale[None, :], os_sc, os_sj,
                        ot_st, ot_sc, ot_sj, R0, R1)


@triton.jit
def _seg_outer_kernel(
    p_ptr, q_ptr, keep_ptr, seg_ptr, os_ptr, ot_ptr,
    n_rows, C, chunk,
    stride_pm, stride_pc, stride_qm, stride_qj,
    os_sc, os_sj, ot_st, ot_sc, ot_sj,
    shared_scale, task_scale, drop_seed, drop_p,
    NUM_TASKS: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R_PAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Segment-wise ``G_t[c, j] = scale_j * sum_{n in seg t} P[n, c] Q[n, j] keep[n]`` (fp32 atomics).

    Used for ``dA = s g^T x_l``: P = x ([N, d_in]; DROPOUT applies the Philox keep mask / (1 - p) on the fly,
    so x_l is never materialised), Q = g ([N, R_PAD], fp32). The shared columns (j < R0) sum over all rows into
    os [C, R0]; the task columns into ot [T, C, R1] (layouts via strides, so dA [r, d_in] is written transposed
    in place). One program = one row chunk (runtime ``chunk``) of one task x BLOCK_C columns.
    """
    dt = p_ptr.dtype.element_ty
    task, row_start, seg_end = _segment_tile(tl.program_id(0), seg_ptr, n_rows, NUM_TASKS, R1 > 0, chunk)
    if task < 0:
        return
    row_end = tl.minimum(seg_end, row_start + chunk)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    offs_l = tl.arange(0, BLOCK_L)
    offs_j = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_C, R_PAD), dtype=tl.float32)
    for i in range(0, tl.cdiv(row_end - row_start, BLOCK_L)):
        rows = row_start + i * BLOCK_L + offs_l
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        pt = tl.load(p_ptr + rows64[:, None] * stride_pm + cols[None, :] * stride_pc,
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_L, BLOCK_C]
        if DROPOUT:
            keep = _dropout_keep(drop_seed, rows64, tl.program_id(1) * BLOCK_C, C, drop_p, BLOCK_L, BLOCK_C)
            pt = tl.where(keep, pt.to(tl.float32) * (1.0 / (1.0 - drop_p)), 0.0).to(dt)
        qt = tl.load(q_ptr + rows64[:, None] * stride_qm + offs_j[None, :] * stride_qj,
                     mask=row_mask[:, None], other=0.0)
        if HAS_KEEP:
            kp = tl.load(keep_ptr + rows64, mask=row_mask, other=0)
            qt = tl.where(kp[:, None] != 0, qt, 0.0)
        acc = tl.dot(tl.trans(pt), qt.to(dt), acc, input_precision=INPUT_PRECISION)
    scale = tl.where(offs_j < R0, shared_scale, task_scale)
    _atomic_add_cat(os_ptr, ot_ptr, task, cols, col_mask, offs_j, acc * scale[None, :], os_sc, os_sj,
                    ot_st, ot_sc, ot_sj, R0, R1)


@triton.jit
def _dropout_mask_kernel(out_ptr, n_rows, C, drop_seed, drop_p, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out [N, C] uint8 = the keep mask the kernels use for (seed, p): for the reference and the tests."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)
    keep = _dropout_keep(drop_seed, rows64, tl.program_id(1) * BLOCK_C, C, drop_p, BLOCK_M, BLOCK_C)
    tl.store(out_ptr + rows64[:, None] * C + cols[None, :], keep.to(tl.uint8),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < C))


# GPU only: a few configs around the H100 sweet spot. Configs that exceed shared memory or registers are
# dropped by the autotuner (it times them as inf). The key separates the forward (stride_wk == 1: x W^T) and
# backward (dY W) operand layouts, the in-place "side" epilogue, and token-count buckets (n_bucket: powers of
# two), so a new token count inside a bucket does not retune. ``restore_value``: the in-place ACCUMULATE
# variant must not add the LoRA term once per timed config.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_GEMM_KEY = ["K", "C", "R_PAD", "FUSE_SHRINK", "SPLIT_OUT", "ACCUMULATE", "EPI_DROPOUT", "stride_wk", "n_bucket",
             "num_progs", "TMA"]
_INTERPRET_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}),
]


def _interpret_bench(kernel_call, quantiles):
    """do_bench for the interpreter: runs the config once; the second config "wins" (it is not the heuristic
    one, so a test sees the autotuned choice in use)."""
    kernel_call()
    _interpret_bench.calls += 1
    return [float(_interpret_bench.calls % 2 == 1)] * len(quantiles)


_interpret_bench.calls = 0
if _AUTOTUNE:
    _multi_lora_gemm = triton.autotune(
        configs=_INTERPRET_CONFIGS if _INTERPRET else _GEMM_CONFIGS, key=_GEMM_KEY, restore_value=["out_ptr"],
        do_bench=_interpret_bench if _INTERPRET else None)(_multi_lora_gemm_kernel)
else:
    _multi_lora_gemm = _multi_lora_gemm_kernel


# ----------------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul setting (TF32 off by default), so the fp32 path is a true fp32 reference.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _rank_pad(r0: int, r1: int) -> int:
    return max(16, triton.next_power_of_2(max(1, r0 + r1)))


def _n_bucket(n_rows: int) -> int:
    """Token-count bucket of the autotune key: the next power of two, clamped to [1024, 2**17]."""
    return min(1 << 17, max(1024, triton.next_power_of_2(max(1, n_rows))))


class _CatOperand:
    """Strided view of the concatenated-rank matrix M[j, o] = [M_0; M_t] built from two parameters.

    ``shared``: 2-D piece (or None), ``task``: 3-D stacked piece (or None); ``j_dim``/``o_dim`` say which
    dimension of the shared piece is the rank j and which the other index o (the task piece has them shifted
    by one). A [r, d] pieces are (j_dim=0), B [d, r] pieces are (j_dim=1): no transposed copies are made.
    """

    def __init__(self, shared: Optional[torch.Tensor], task: Optional[torch.Tensor], j_dim: int, dummy: torch.Tensor):
        o_dim = 1 - j_dim
        if shared is not None:
            self.s_ptr, self.s_sj, self.s_so = shared, shared.stride(j_dim), shared.stride(o_dim)
        else:
            self.s_ptr, self.s_sj, self.s_so = dummy, 0, 0
        if task is not None:
            self.t_ptr, self.t_st = task, task.stride(0)
            self.t_sj, self.t_so = task.stride(j_dim + 1), task.stride(o_dim + 1)
        else:
            self.t_ptr, self.t_st, self.t_sj, self.t_so = dummy, 0, 0, 0

    def kernel_args(self):
        return (self.s_ptr, self.s_sj, self.s_so, self.t_ptr, self.t_st, self.t_sj, self.t_so)


class _Dropout:
    """LoRA dropout done inside the kernels: probability ``p`` and the Philox ``seed`` of this call."""

    def __init__(self, p: float = 0.0, seed: int = 0):
        self.p, self.seed = float(p), int(seed)

    @property
    def on(self) -> bool:
        return self.p > 0.0


_NO_DROPOUT = _Dropout()


def _gemm_meta(dtype: torch.dtype) -> dict:
    """Block sizes when not autotuning (interpreter, or CKF_LORA_AUTOTUNE=0)."""
    if _INTERPRET:
        # The interpreter runs each program as numpy ops: few, big-ish programs are fastest.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _tma_alloc(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global scratch for the device-side TMA descriptors (``tl.make_tensor_descriptor``: 128 bytes each)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Device-side descriptors need a Triton scratch allocator on CUDA. ``triton.set_allocator`` sets a
    ContextVar (autograd's backward runs in another thread), so this runs before every CUDA TMA launch;
    an allocator the caller set is kept."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_alloc)


def _tma_ok(x: torch.Tensor, weight: torch.Tensor, wt_strides) -> Optional[bool]:
    """None when the TMA loads cannot be used for this GEMM, else W_K_CONTIG (W's contiguous dimension is K:
    the forward x W^T layout). TMA needs a contiguous last dimension of the described 2-D tensor and 16-byte
    aligned base pointers and other strides; anything else (a column-strided x, an odd hidden size at this
    element size, an offset view) keeps the pointer loads."""
    stride_wk, stride_wc = wt_strides
    if x.stride(1) != 1 and x.shape[1] > 1:
        return None
    if stride_wk == 1:
        w_k_contig, w_outer = True, stride_wc
    elif stride_wc == 1:
        w_k_contig, w_outer = False, stride_wk
    else:
        return None
    aligned = (x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
               and (x.stride(0) * x.element_size()) % 16 == 0 and (w_outer * weight.element_size()) % 16 == 0)
    return w_k_contig if aligned else None


def _launch_gemm(x, wt_strides, weight, bias, out, out2, h, seg, shrink: Optional[_CatOperand],
                 expand: _CatOperand, r0, r1, num_tasks, shared_scale, task_scale, fuse_shrink, store_h,
                 accumulate=False, epi_dropout: _Dropout = _NO_DROPOUT, tiles: Optional[torch.Tensor] = None,
                 tma: bool = False):
    """out = x @ Wt (+ LoRA epilogue) (+ bias). x [N, K], out [N, C]; Wt strides ``wt_strides`` over ``weight``.
    ``accumulate``: no GEMM, ``out += LoRA term`` in place (out holds cuBLAS's result). ``tma``: load the x and
    W tiles through TMA descriptors where ``_tma_ok`` allows (pointer loads otherwise)."""
    n_rows, k_dim = x.shape
    c_dim = out.shape[1]
    r_pad = h.shape[1]
    has_task = r1 > 0
    extra_tiles = num_tasks if has_task else 0
    dummy = out
    shrink = shrink if shrink is not None else expand  # only read with FUSE_SHRINK

    persistent = PERSISTENT_PROGRAMS is not None
    w_k_contig = _tma_ok(x, weight, wt_strides) if tma and not accumulate else None
    use_tma = w_k_contig is not None
    if use_tma and x.is_cuda:
        _ensure_tma_allocator()
    use_tiles = tiles is not None and has_task

    def grid(meta):
        if persistent:
            return (PERSISTENT_PROGRAMS,)
        return ((triton.cdiv(n_rows, meta["BLOCK_M"]) + extra_tiles) * triton.cdiv(c_dim, meta["BLOCK_N"]),)

    args = (
        x, weight, bias.contiguous() if bias is not None else dummy, out, out2 if out2 is not None else dummy, h, seg,
        tiles if use_tiles else seg,
        *shrink.kernel_args(), *expand.kernel_args(),
        n_rows, k_dim, c_dim, tiles.shape[2] if use_tiles else 0, PERSISTENT_PROGRAMS or 1,
    )
    strides = (
        x.stride(0), x.stride(1), wt_strides[0], wt_strides[1], out.stride(0), out.stride(1),
        out2.stride(0) if out2 is not None else 0, out2.stride(1) if out2 is not None else 0,
        h.stride(0), h.stride(1), float(shared_scale), float(task_scale),
        epi_dropout.seed, epi_dropout.p, _n_bucket(n_rows),
    )
    consts = dict(
        NUM_TASKS=num_tasks if has_task else 1, R0=r0, R1=r1, R_PAD=r_pad, HAS_BIAS=bias is not None,
        FUSE_SHRINK=bool(fuse_shrink), STORE_H=bool(store_h), SPLIT_OUT=out2 is not None,
        ACCUMULATE=bool(accumulate), EPI_DROPOUT=epi_dropout.on, INPUT_PRECISION=_input_precision(x.dtype),
        USE_TILES=use_tiles, PERSISTENT=persistent, TMA=use_tma, W_K_CONTIG=bool(w_k_contig),
    )
    if _AUTOTUNE:
        _multi_lora_gemm[grid](*args, *strides, **consts)
    else:
        meta = _gemm_meta(x.dtype)
        _multi_lora_gemm_kernel[grid(meta)](*args, *strides, **consts, **meta)


def _launch_shrink(x, h, seg, shrink: _CatOperand, r0, r1, num_tasks, dropout: _Dropout = _NO_DROPOUT):
    """h[N, R_PAD] = per-row-task shrink of x_l [N, K] (pad columns come out 0)."""
    n_rows, k_dim = x.shape
    if n_rows == 0:
        return
    has_task = r1 > 0
    if _INTERPRET:
        meta = dict(BLOCK_M=16, BLOCK_K=32)
    else:
        meta = dict(BLOCK_M=64, BLOCK_K=128 if x.element_size() <= 2 else 64, num_warps=4, num_stages=3)
    grid = (triton.cdiv(n_rows, meta["BLOCK_M"]) + (num_tasks if has_task else 0),)
    _shrink_kernel[grid](
        x, h, seg, *shrink.kernel_args(), n_rows, k_dim, x.stride(0), x.stride(1), h.stride(0), h.stride(1),
        dropout.seed, dropout.p,
        NUM_TASKS=num_tasks if has_task else 1, R0=r0, R1=r1, R_PAD=h.shape[1], DROPOUT=dropout.on,
        INPUT_PRECISION=_input_precision(x.dtype), **meta)


def _seg_outer_meta(dtype: torch.dtype, n_rows: int, c_dim: int) -> dict:
    """Block sizes and the row chunk (``CHUNK``, a runtime kernel argument) of the segment-wise reductions."""
    if _INTERPRET:
        # CHUNK = 2 * BLOCK_L so the tests cover both several chunks per segment and a loop inside a chunk.
        return dict(BLOCK_L=16, BLOCK_C=32, CHUNK=32)
    meta = dict(BLOCK_L=64, BLOCK_C=128 if dtype != torch.float32 else 64, num_warps=4, num_stages=3)
    # Aim at ~1024 programs: enough to fill an H100 even when one task owns every row, while keeping the
    # number of fp32 atomics (programs x BLOCK_C x R) small next to reading P once.
    n_col = triton.cdiv(c_dim, meta["BLOCK_C"])
    row_programs = max(1, 1024 // n_col)
    meta["CHUNK"] = min(4096, max(meta["BLOCK_L"], triton.next_power_of_2(triton.cdiv(max(n_rows, 1), row_programs))))
    return meta


def _split_meta(meta: dict):
    chunk = meta["CHUNK"]
    return chunk, {k: v for k, v in meta.items() if k != "CHUNK"}


def _launch_dy_pass(dy, h, keep, seg, g, b_op: _CatOperand, out_shared, os_strides, out_task, ot_strides,
                    r0, r1, num_tasks, shared_scale, task_scale):
    """g [N, R_PAD] fp32 (zero-filled) += dY B_cat and dB (fp32 buffers, zero-filled) += s dY^T (h keep), in one
    pass over dY [N, d_out]. ``g`` None: dB only; ``out_shared`` and ``out_task`` None: g only."""
    n_rows, c_dim = dy.shape
    if n_rows == 0:
        return
    has_task = r1 > 0
    chunk, meta = _split_meta(_seg_outer_meta(dy.dtype, n_rows, c_dim))
    grid = (triton.cdiv(n_rows, chunk) + (num_tasks if has_task else 0), triton.cdiv(c_dim, meta["BLOCK_C"]))
    do_db = out_shared is not None or out_task is not None
    dummy = h
    _dy_pass_kernel[grid](
        dy, h, keep if keep is not None else dummy, seg, g if g is not None else dummy,
        out_shared if out_shared is not None else dummy, out_task if out_task is not None else dummy,
        *b_op.kernel_args(), n_rows, c_dim, chunk,
        dy.stride(0), dy.stride(1), h.stride(0), h.stride(1),
        g.stride(0) if g is not None else 0, g.stride(1) if g is not None else 0,
        *os_strides, *ot_strides, float(shared_scale), float(task_scale),
        NUM_TASKS=num_tasks if has_task else 1, R0=r0, R1=r1, R_PAD=h.shape[1],
        DO_G=g is not None, DO_DB=do_db, HAS_KEEP=keep is not None,
        INPUT_PRECISION=_input_precision(dy.dtype), **meta)


def _launch_seg_outer(p, q, keep, seg, out_shared, os_strides, out_task, ot_strides, r0, r1, num_tasks,
                      shared_scale, task_scale, dropout: _Dropout = _NO_DROPOUT):
    """Accumulates the shared [C, r0] and task [T, C, r1] adapter gradients (fp32 buffers, zero-filled)."""
    n_rows, c_dim = p.shape
    if n_rows == 0:
        return
    has_task = r1 > 0
    chunk, meta = _split_meta(_seg_outer_meta(p.dtype, n_rows, c_dim))
    grid = (triton.cdiv(n_rows, chunk) + (num_tasks if has_task else 0), triton.cdiv(c_dim, meta["BLOCK_C"]))
    dummy = q
    _seg_outer_kernel[grid](
        p, q, keep if keep is not None else dummy, seg,
        out_shared if out_shared is not None else dummy, out_task if out_task is not None else dummy,
        n_rows, c_dim, chunk, p.stride(0), p.stride(1), q.stride(0), q.stride(1), *os_strides, *ot_strides,
        float(shared_scale), float(task_scale), dropout.seed, dropout.p,
        NUM_TASKS=num_tasks if has_task else 1, R0=r0, R1=r1, R_PAD=q.shape[1], HAS_KEEP=keep is not None,
        DROPOUT=dropout.on, INPUT_PRECISION=_input_precision(p.dtype), **meta)


def dropout_keep_mask(seed: int, n_rows: int, width: int, p: float, device) -> torch.Tensor:
    """[n_rows, width] bool: the LoRA-dropout keep mask the kernels generate for (seed, p). The reference fed
    ``lora_x = x * mask / (1 - p)`` reproduces the fused-dropout path exactly (tests, debugging)."""
    out = torch.empty(n_rows, width, dtype=torch.uint8, device=device)
    if out.numel():
        # Tile shape unlike every kernel's (8 x 16): the mask must not depend on it (the tests rely on that).
        grid = (triton.cdiv(n_rows, 8), triton.cdiv(width, 16))
        _dropout_mask_kernel[grid](out, n_rows, width, int(seed), float(p), BLOCK_M=8, BLOCK_C=16)
    return out.bool()


# Fused shrink only for outputs this narrow (unless a measured win table says otherwise): fusing adds
# R_PAD / BLOCK_N MMA work to every column tile of a compute-bound GEMM, and the compiled K loop then waits on
# both wgmma chains each iteration; a separate pass costs one read of x (~270 / d_out of the GEMM on an H100).
FUSE_MAX_WIDTH = 512


def _should_fuse(separate_lora_input: bool, fuse_shrink: Optional[bool], r_pad: int, c_dim: int) -> bool:
    """Fuse the forward shrink into the GEMM's K loop, or run it as a separate pass over the input?

    Never with a separate LoRA input (``lora_x`` or dropout: the GEMM's x is not the shrink's input).
    ``fuse_shrink`` overrides the rule (the benchmark times both); otherwise fuse only for ``d_out <=
    FUSE_MAX_WIDTH`` (the old ``R_PAD * d_out <= 32768`` rule fused d=2048 r8 at its threshold: +12.5% MMA).
    """
    if separate_lora_input:
        return False
    if fuse_shrink is not None:
        return bool(fuse_shrink)
    return c_dim <= FUSE_MAX_WIDTH


class _Dims:
    """Shapes of one call, derived from tensor shapes only (no device reads)."""

    def __init__(self, x2, weight, shared_a, task_a):
        self.n_rows, self.d_in = x2.shape
        self.d_out = weight.shape[0]
        self.r0 = shared_a.shape[0] if shared_a is not None else 0
        self.num_tasks = task_a.shape[0] if task_a is not None else 0
        self.r1 = task_a.shape[1] if task_a is not None else 0
        self.r_pad = _rank_pad(self.r0, self.r1)


# ----------------------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------------------
BASES = ("triton", "cublas")


class MultiLoRALinearFn(torch.autograd.Function):
    """Autograd wrapper. Passes over [N, d] tensors beyond the two base GEMMs (P = one pass):

    * forward: the shrink (fused into the GEMM: 0 P; else one pass over x: 1 P), the expand in the GEMM
      epilogue (``base="triton"``) or added in place to cuBLAS's output (``base="cublas"``: +2 P, read + write y);
    * backward: one pass over dY for both g = dY B_cat and dB (1 P), the LoRA term of dX in the dX GEMM's
      epilogue (cuBLAS base: +2 P), one pass over x for dA (1 P).
    LoRA dropout (``dropout_p``) is regenerated by Philox in the shrink, the dX epilogue and the dA pass: no
    dropped copy of x, no separate d(lora_x). Saves the LoRA input, ``h`` ([N, R_PAD]) and the parameters.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets, shared_scale, task_scale,
                lora_x=None, fuse_shrink=None, param_grad_rows=None, dropout_p=0.0, dropout_seed=0, base="triton",
                tiles=None, tma=False):
        x2 = x.reshape(-1, x.shape[-1])
        lx2 = lora_x.reshape(-1, lora_x.shape[-1]) if lora_x is not None else None
        dims = _Dims(x2, weight, shared_a, task_a)
        drop = _Dropout(dropout_p, dropout_seed)
        seg = seg_offsets if seg_offsets is not None else x2
        a_op = _CatOperand(shared_a, task_a, j_dim=0, dummy=x2)
        b_op = _CatOperand(shared_b, task_b, j_dim=1, dummy=x2)
        h = _empty(dims.n_rows, dims.r_pad, dtype=x.dtype, device=x.device)
        fuse = base == "triton" and _should_fuse(lx2 is not None or drop.on, fuse_shrink, dims.r_pad, dims.d_out)
        if base == "cublas":
            y = F.linear(x2, weight, bias)
        else:
            y = _empty(dims.n_rows, dims.d_out, dtype=x.dtype, device=x.device)
        if dims.n_rows > 0:
            if not fuse:
                _launch_shrink(lx2 if lx2 is not None else x2, h, seg, a_op, dims.r0, dims.r1, dims.num_tasks, drop)
            # y = x W^T: Wt[k, c] = W[c, k]
            _launch_gemm(x2, (weight.stride(1), weight.stride(0)), weight, None if base == "cublas" else bias,
                         y, None, h, seg, a_op, b_op, dims.r0, dims.r1, dims.num_tasks, shared_scale, task_scale,
                         fuse, store_h=True, accumulate=base == "cublas", tiles=tiles, tma=tma)
        ctx.dims = dims
        ctx.scales = (shared_scale, task_scale)
        ctx.has_lora_x = lora_x is not None
        ctx.drop = drop
        ctx.base = base
        ctx.tiles = tiles  # int32 index list, not differentiable: kept on ctx
        ctx.tma = tma
        ctx.x_shape, ctx.lora_x_shape = x.shape, (lora_x.shape if lora_x is not None else None)
        lora_in = lx2 if lx2 is not None else x2
        x_for_dw = x2 if weight.requires_grad else None
        ctx.save_for_backward(lora_in, x_for_dw, weight, shared_a, shared_b, task_a, task_b, seg_offsets, h,
                              param_grad_rows)
        return y.reshape(*x.shape[:-1], dims.d_out)

    @staticmethod
    def backward(ctx, dy):
        lora_in, x_for_dw, weight, shared_a, shared_b, task_a, task_b, seg_offsets, h, grad_rows = ctx.saved_tensors
        dims = ctx.dims
        shared_scale, task_scale = ctx.scales
        need = ctx.needs_input_grad
        need_dx, need_dw, need_db = need[0], need[1], need[2]
        need_dlx = ctx.has_lora_x and need[10]
        need_da = need[3] or need[5]
        need_dbb = need[4] or need[6]
        dy2 = dy.reshape(-1, dims.d_out)
        dev = dy2.device
        seg = seg_offsets if seg_offsets is not None else dy2
        a_op = _CatOperand(shared_a, task_a, j_dim=0, dummy=dy2)
        b_op = _CatOperand(shared_b, task_b, j_dim=1, dummy=dy2)
        lora_args = (dims.r0, dims.r1, dims.num_tasks)
        # Gradient routing: rows with keep == 0 add nothing to dA/dB (their dX stays complete); applied to the
        # rank-sized factors inside the kernels.
        keep = grad_rows.reshape(-1).to(torch.uint8) if grad_rows is not None else None

        # One pass over dY: g = dY [B_0, B_t] ([N, R_PAD], fp32, feeds dX's LoRA term and dA) and dB.
        need_g = need_dx or need_dlx or need_da
        g = torch.zeros(dims.n_rows, dims.r_pad, dtype=torch.float32, device=dev) if need_g else None
        db0 = dbt = None
        if need_dbb:
            # dB[c, j] = s_j sum_n dY[n, c] h[n, j]  (B is [d_out, r]: natural layout)
            db0 = torch.zeros(dims.d_out, dims.r0, dtype=torch.float32, device=dev) if dims.r0 else None
            dbt = (torch.zeros(dims.num_tasks, dims.d_out, dims.r1, dtype=torch.float32, device=dev)
                   if dims.r1 else None)
        if need_g or need_dbb:
            _launch_dy_pass(dy2, h, keep, seg, g, b_op, db0, (dims.r0, 1), dbt, (dims.d_out * dims.r1, dims.r1, 1),
                            *lora_args, shared_scale, task_scale)

        dx = dlx = None
        if need_dx or need_dlx:
            dlx = _empty(dims.n_rows, dims.d_in, dtype=dy2.dtype, device=dev) if ctx.has_lora_x else None
            if ctx.base == "cublas":
                dx = dy2 @ weight.to(dy2.dtype)
            else:
                dx = _empty(dims.n_rows, dims.d_in, dtype=dy2.dtype, device=dev)
            if dims.n_rows > 0:
                # dX = dY W (+ s g A_cat [* dropout keep / (1 - p)], or into dlx for a separate lora_x).
                _launch_gemm(dy2, (weight.stride(0), weight.stride(1)), weight, None, dx, dlx, g, seg, None, a_op,
                             *lora_args, shared_scale, task_scale, False, store_h=False,
                             accumulate=ctx.base == "cublas", epi_dropout=ctx.drop, tiles=ctx.tiles,
                             tma=ctx.tma)

        d_sa = d_ta = None
        if need_da:
            # dA[j, c] = s_j sum_n g[n, j] x_l[n, c]  (A is [r, d_in]: written transposed via strides)
            da0 = torch.zeros(dims.r0, dims.d_in, dtype=torch.float32, device=dev) if dims.r0 else None
            dat = (torch.zeros(dims.num_tasks, dims.r1, dims.d_in, dtype=torch.float32, device=dev)
                   if dims.r1 else None)
            _launch_seg_outer(lora_in, g, keep, seg, da0, (1, dims.d_in), dat, (dims.r1 * dims.d_in, 1, dims.d_in),
                              *lora_args, shared_scale, task_scale, dropout=ctx.drop)
            d_sa = da0.to(shared_a.dtype) if da0 is not None and need[3] else None
            d_ta = dat.to(task_a.dtype) if dat is not None and need[5] else None
        d_sb = db0.to(shared_b.dtype) if db0 is not None and need[4] else None
        d_tb = dbt.to(task_b.dtype) if dbt is not None and need[6] else None

        # Frozen base weight is the design point; these torch fallbacks only keep autograd honest otherwise.
        d_w = (dy2.t().to(x_for_dw.dtype) @ x_for_dw).to(weight.dtype) if need_dw else None
        d_bias = dy2.sum(0) if need_db else None
        if dx is not None:
            dx = dx.reshape(ctx.x_shape) if need_dx else None
        if dlx is not None:
            dlx = dlx.reshape(ctx.lora_x_shape) if need_dlx else None
        return (dx, d_w, d_bias, d_sa, d_sb, d_ta, d_tb, None, None, None, dlx,
                None, None, None, None, None, None, None)


def triton_base_gemm(a: torch.Tensor, weight: torch.Tensor, layout: str, tma: Optional[bool] = None) -> torch.Tensor:
    """The Triton GEMM of the fused path without any LoRA term, for the cuBLAS-parity check of the benchmark:
    ``layout="fwd"``: a [N, d_in] @ W^T -> [N, d_out]; ``"bwd"``: a [N, d_out] @ W -> [N, d_in]. ``tma``: TMA
    descriptor loads (None: ``USE_TMA``)."""
    strides = (weight.stride(1), weight.stride(0)) if layout == "fwd" else (weight.stride(0), weight.stride(1))
    c_dim = weight.shape[0] if layout == "fwd" else weight.shape[1]
    out = _empty(a.shape[0], c_dim, dtype=a.dtype, device=a.device)
    dummy_h = torch.zeros(1, 16, dtype=a.dtype, device=a.device)
    none = _CatOperand(None, None, 0, dummy=a)
    if a.shape[0]:
        _launch_gemm(a, strides, weight, None, out, None, dummy_h, a, none, none, 0, 0, 0, 0.0, 0.0, False,
                     store_h=False, tma=USE_TMA if tma is None else bool(tma))
    return out


def chosen_gemm_configs() -> dict:
    """{autotune key: chosen config as text} of the GEMM so far ({} when not autotuning)."""
    cache = getattr(_multi_lora_gemm, "cache", None) or {}
    return {key: str(cfg) for key, cfg in cache.items()}


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def multi_lora_linear_triton(x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets,
                             shared_scale: float, task_scale: float, lora_x=None, fuse_shrink: Optional[bool] = None,
                             param_grad_rows=None, lora_dropout: float = 0.0, dropout_seed: Optional[int] = None,
                             base: str = "triton", check_segments: bool = True, tiles: Optional[torch.Tensor] = None,
                             tma: Optional[bool] = None):
    """Fused Triton multi-task LoRA linear; same maths, shapes and arguments as ``multi_lora_linear_reference``.

    Shapes: x, lora_x [..., d_in] (rows sorted by task); weight [d_out, d_in]; bias [d_out] | None;
    shared_a [r0, d_in], shared_b [d_out, r0] | None; task_a [T, r, d_in], task_b [T, d_out, r] | None;
    seg_offsets [T + 1] integer tensor on x's device (never read on the host). Returns [..., d_out].
    ``fuse_shrink``: where the forward shrink goes with ``base="triton"``: None = the width rule
    (``d_out <= FUSE_MAX_WIDTH``), True/False force it into / out of the GEMM's K loop (benchmark, win table).
    The backward always takes g from the one pass over dY that also gives dB.
    ``param_grad_rows``: [N] bool or None, rows whose adapter parameter gradients count (see the reference).
    ``lora_dropout``: LoRA dropout probability applied inside the kernels (Philox keep mask from
    ``dropout_seed``; None draws a seed from torch's CPU generator, so checkpoint recomputation replays it);
    the result equals the reference fed ``lora_x = x * dropout_keep_mask(seed, N, d_in, p) / (1 - p)``.
    ``base``: "triton" = the base GEMM in Triton with the LoRA expand in its epilogue; "cublas" = cuBLAS for
    x W^T / dY W and the LoRA terms added by the side kernels (the safe fallback of ``impl="auto"``).
    ``check_segments``: validate seg_offsets against the row count (``check_segment_offsets``; no host sync).
    ``tiles``: the batch's tile list (``build_tile_list(seg_offsets, N)``, built once per batch); None = every
    GEMM program scans the offsets.
    ``tma``: the base GEMM (``base="triton"``, forward x W^T and backward dY W) loads its x / dY and W tiles
    through TMA tensor descriptors (None: ``USE_TMA``, env ``CKF_LORA_TMA=1``; off by default). Used only where
    the operands allow it (contiguous last dimension, 16-byte aligned base pointers and row strides); the
    pointer loads otherwise.
    """
    if (shared_a is None) != (shared_b is None) or (task_a is None) != (task_b is None):
        raise ValueError("an adapter needs both its A and its B (or neither)")
    if not (x.is_cuda or _INTERPRET):
        raise RuntimeError("multi_lora_linear_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "importing ckf_dist.kernels.multi_lora_triton); use impl='torch' on CPU")
    if shared_a is None and task_a is None:
        return F.linear(x, weight, bias)
    if base not in BASES:
        raise ValueError(f"base={base!r} is not one of {BASES}")
    if task_a is not None:
        if seg_offsets is None or seg_offsets.shape != (task_a.shape[0] + 1,):
            raise ValueError(f"seg_offsets must have shape [T + 1] = [{task_a.shape[0] + 1}]")
        if seg_offsets.device != x.device:
            raise ValueError("seg_offsets must live on x's device (no host sync in the hot path)")
        if check_segments:
            check_segment_offsets(seg_offsets, x.numel() // x.shape[-1])
        n_rows = x.numel() // x.shape[-1]
        want = (len(TILE_BLOCKS), 2, -(-n_rows // TILE_BLOCKS[0]) + task_a.shape[0])
        if tiles is not None and (tuple(tiles.shape) != want or tiles.dtype != torch.int32):
            raise ValueError(f"tiles must be build_tile_list(seg_offsets, {n_rows}): int32 {want}, got "
                             f"{tiles.dtype} {tuple(tiles.shape)}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if lora_dropout > 0 and lora_x is not None:
        raise ValueError("pass either lora_x (dropout done outside) or lora_dropout (fused), not both")
    if lora_dropout > 0 and dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())  # CPU generator: no device sync
    r_total = (shared_a.shape[0] if shared_a is not None else 0) + (task_a.shape[1] if task_a is not None else 0)
    if r_total > 2 * MAX_RANK:
        raise ValueError(f"shared + task rank {r_total} > {2 * MAX_RANK} is not supported by these kernels")
    if lora_x is not None and lora_x.shape != x.shape:
        raise ValueError("lora_x must have x's shape")
    if param_grad_rows is not None and param_grad_rows.numel() != x.numel() // x.shape[-1]:
        raise ValueError(f"param_grad_rows has {param_grad_rows.numel()} entries for {x.numel() // x.shape[-1]} rows")
    return MultiLoRALinearFn.apply(x, weight, bias, shared_a, shared_b, task_a, task_b, seg_offsets,
                                   float(shared_scale), float(task_scale), lora_x, fuse_shrink, param_grad_rows,
                                   float(lora_dropout), int(dropout_seed or 0), base, tiles,
                                   USE_TMA if tma is None else bool(tma))


class MultiLoRALinear(torch.nn.Module):
    """Thin module: frozen base linear + shared LoRA (rank r0) + T stacked task LoRAs (rank r).

    Parameters are stored stacked (A [T, r, d_in], B [T, d_out, r]) so one kernel applies them all and ZeRO-3
    can partition them like any parameter. ``forward(x, seg_offsets)`` takes rows already sorted by task.
    """

    def __init__(self, in_features: int, out_features: int, num_tasks: int, task_rank: int = 16,
                 shared_rank: int = 16, task_alpha: float = 64.0, shared_alpha: float = 64.0, bias: bool = False,
                 lora_dropout: float = 0.0, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None
        self.shared_a = torch.nn.Parameter(torch.empty(shared_rank, in_features, **kw)) if shared_rank else None
        self.shared_b = torch.nn.Parameter(torch.zeros(out_features, shared_rank, **kw)) if shared_rank else None
        self.task_a = torch.nn.Parameter(torch.empty(num_tasks, task_rank, in_features, **kw)) if task_rank else None
        self.task_b = torch.nn.Parameter(torch.zeros(num_tasks, out_features, task_rank, **kw)) if task_rank else None
        self.shared_scale = shared_alpha / shared_rank if shared_rank else 0.0
        self.task_scale = task_alpha / task_rank if task_rank else 0.0
        self.dropout = torch.nn.Dropout(lora_dropout) if lora_dropout > 0 else None
        self.impl = impl
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # Standard LoRA init: A random, B zero, so the adapters start as the identity update.
        for a in (self.shared_a, self.task_a):
            if a is not None:
                torch.nn.init.kaiming_uniform_(a.view(-1, a.shape[-1]), a=math.sqrt(5))

    def forward(self, x: torch.Tensor, seg_offsets: torch.Tensor) -> torch.Tensor:
        from . import multi_lora_linear  # the package-level dispatch (torch reference on CPU)

        p = self.dropout.p if (self.dropout is not None and self.training) else 0.0
        return multi_lora_linear(x, self.weight, self.bias, self.shared_a, self.shared_b, self.task_a, self.task_b,
                                 seg_offsets, self.shared_scale, self.task_scale, lora_dropout=p, impl=self.impl)


__all__ = ["multi_lora_linear_triton", "MultiLoRALinearFn", "MultiLoRALinear", "dropout_keep_mask", "triton_base_gemm",
           "chosen_gemm_configs", "build_tile_list"]
