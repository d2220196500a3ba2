"""Fused Triton multi-LoRA kernels against the PyTorch reference, forward and backward.

CPU: the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at tiny shapes, fp32 and fp16
only (the interpreter's bf16 ``tl.dot`` is broken upstream). GPU (``-m gpu``): a grid of tasks, ranks, hidden
sizes and dtypes with per-dtype tolerances.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ckf_dist.kernels import multi_lora_linear, multi_lora_linear_reference
from ckf_dist.kernels.multi_lora_triton import MultiLoRALinear, dropout_keep_mask, multi_lora_linear_triton

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def check_against_reference(kt, case, tol, param_grad_rows=None, **kwargs):
    """Triton (case dtype) vs the reference in float64 on the same inputs; also vs the low-precision reference
    so a tolerance failure says whether the kernel is worse than plain torch at that dtype."""
    y, grads = kt.run(multi_lora_linear_triton, case, param_grad_rows=param_grad_rows, **kwargs)
    y64, grads64 = kt.run(multi_lora_linear_reference, case, cast=lambda t: t.double(), param_grad_rows=param_grad_rows)
    assert y.dtype == case.x.dtype and y.shape == y64.shape
    assert grads.keys() == grads64.keys()
    # kt.rel_err is ckf_dist.testing.max_rel_err: inf when a tensor holds a NaN/inf, so kt.within fails it
    errs = {"y": kt.rel_err(y, y64)} | {k: kt.rel_err(grads[k], grads64[k]) for k in grads64}
    bad = {k: e for k, e in errs.items() if not kt.within(e, tol)}
    if bad and case.x.dtype != torch.float32:
        # Low precision: accept when within 2x (+tol/4) of what torch itself achieves at this dtype (never a
        # non-finite error: max_rel_err is inf then, and so is the bound when torch's own result overflowed).
        y_lp, g_lp = kt.run(multi_lora_linear_reference, case, param_grad_rows=param_grad_rows)
        base = {"y": kt.rel_err(y_lp, y64)} | {k: kt.rel_err(g_lp[k], grads64[k]) for k in grads64}
        bad = {k: (e, base[k]) for k, e in bad.items() if not kt.within(e, 2 * base[k] + tol / 4)}
    assert not bad, f"relative errors above {tol} (inf = NaN/inf in the output): {bad}"
    return errs


# --------------------------------------------------------------------------------------------------------
# CPU (interpreter) tests: tiny shapes; d not a multiple of the blocks (16/32) on purpose.
# --------------------------------------------------------------------------------------------------------
INTERP_CASES = {  # name: (counts, d_in, d_out, r, r0, lora_x, fuse_shrink)
    "mixed_fused": ([9, 14, 6], 37, 45, 5, 3, False, True),
    "mixed_separate_shrink": ([9, 14, 6], 37, 45, 5, 3, False, False),
    "empty_segments": ([0, 19, 0, 0, 7, 0], 29, 33, 4, 2, False, None),
    "one_row": ([0, 1, 0], 19, 21, 3, 2, False, None),
    "no_rows": ([0, 0, 0], 19, 21, 3, 2, False, None),
    "shared_only": ([17, 5], 23, 30, 0, 4, False, None),
    "task_only": ([5, 0, 17], 23, 30, 6, 0, False, True),
    "lora_x": ([8, 0, 13], 27, 22, 3, 5, True, None),
    "rank_1": ([6, 11], 20, 18, 1, 1, False, None),
    "rank_64_plus_64": ([5, 12], 18, 20, 64, 64, False, False),
    "sixteen_tasks": ([3, 0, 0, 1, 0, 2, 0, 0, 4, 0, 0, 0, 1, 0, 0, 5], 17, 19, 2, 2, False, True),
    # 70 rows > the interpreter's CHUNK (32): three row chunks of one task add into the same adapter gradient
    # through the fp32 atomics, and the shared gradient sums chunks of two tasks.
    "long_segment": ([70, 0, 5], 20, 24, 4, 2, False, None),
    "long_segment_lora_x": ([3, 66], 18, 21, 3, 3, True, None),
}


@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_triton_matches_reference_fp32(kt, name):
    counts, d_in, d_out, r, r0, lx, fuse = INTERP_CASES[name]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=torch.float32, device=DEVICE, lora_x=lx)
    check_against_reference(kt, case, tol=1e-5 if not HAS_CUDA else 2e-5, fuse_shrink=fuse)


@pytest.mark.parametrize("name", ["mixed_fused", "mixed_separate_shrink", "empty_segments", "lora_x", "long_segment"])
def test_triton_matches_reference_fp16(kt, name):
    counts, d_in, d_out, r, r0, lx, fuse = INTERP_CASES[name]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=torch.float16, device=DEVICE, lora_x=lx)
    check_against_reference(kt, case, tol=1e-2, fuse_shrink=fuse)


@pytest.mark.parametrize("pattern", ["mixed", "none"])
@pytest.mark.parametrize("name", ["mixed_fused", "mixed_separate_shrink", "empty_segments", "lora_x", "shared_only",
                                  "task_only"])
def test_triton_param_grad_rows_matches_per_row_oracle_fp32(kt, name, pattern):
    """Gradient routing in the fused backward: adapter gradients over the rows with param_grad_rows True only,
    dX over every row; against the per-row oracle in float64 (and the unrouted dX)."""
    counts, d_in, d_out, r, r0, lx, fuse = INTERP_CASES[name]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=torch.float32, device=DEVICE, lora_x=lx)
    mask = kt.grad_rows(case.x.shape[0], pattern, device=DEVICE)
    y, g = kt.run(multi_lora_linear_triton, case, fuse_shrink=fuse, param_grad_rows=mask)
    y64, g64 = kt.run(kt.per_row(case), case, cast=lambda t: t.double(), param_grad_rows=mask)
    tol = 1e-5 if not HAS_CUDA else 2e-5
    errs = {"y": kt.rel_err(y, y64)} | {k: kt.rel_err(g[k], g64[k]) for k in g64}
    assert g.keys() == g64.keys() and all(kt.within(e, tol) for e in errs.values()), errs
    if pattern == "none":
        for k in ("shared_a", "shared_b", "task_a", "task_b"):
            if k in g:
                assert torch.count_nonzero(g[k]) == 0, k
    _, g_plain = kt.run(multi_lora_linear_triton, case, fuse_shrink=fuse)
    for k in ("x", "lora_x"):
        if k in g:
            kt.close(g[k], g_plain[k], rtol=1e-6, atol=1e-6, name=f"d{k} (every row, routing or not)")


def test_long_segment_really_spans_several_chunks():
    """The long_segment cases above only test the multi-chunk atomic path if a segment exceeds the CHUNK the
    interpreter launcher uses; guard that assumption."""
    from ckf_dist.kernels import multi_lora_triton as mlt

    chunk = mlt._seg_outer_meta(torch.float32, n_rows=75, c_dim=24)["CHUNK"]
    assert max(INTERP_CASES["long_segment"][0]) > 2 * chunk
    assert max(INTERP_CASES["long_segment_lora_x"][0]) > 2 * chunk


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """A non-contiguous view holding t's values: "cols" = every other column of a wider buffer, "t" = the
    transpose of a transposed contiguous copy (column-major storage)."""
    if how == "cols":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        buf[..., ::2] = t.detach()
        view = buf[..., ::2]
    else:
        view = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not view.is_contiguous() and torch.equal(view, t.detach())
    return view.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("fuse", [True, False])
def test_triton_noncontiguous_views_fp32(kt, fuse):
    """x, lora_x, W, the adapters and dY as strided views (never copied to contiguous by the launchers):
    same values, same results as the reference on contiguous tensors."""
    case = kt.Case([9, 0, 35], 19, 23, 3, 2, device=DEVICE, lora_x=not fuse)
    x = _strided(case.x, "cols")
    w = _strided(case.weight, "t")
    sa, sb = _strided(case.shared_a, "t"), _strided(case.shared_b, "cols")
    ta, tb = _strided(case.task_a, "cols"), _strided(case.task_b, "t")
    lx = _strided(case.lora_x, "t") if case.lora_x is not None else None
    dy = case.dy[:1].expand(case.dy.shape)  # stride 0 over rows, as autograd hands out for a broadcast loss
    leaves = [t for t in (x, sa, sb, ta, tb, lx) if t is not None]
    y = multi_lora_linear_triton(x, w, case.bias, sa, sb, ta, tb, case.seg, case.shared_scale, case.task_scale,
                                 lora_x=lx, fuse_shrink=fuse)
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().contiguous().requires_grad_() for t in leaves]
    rx, rsa, rsb, rta, rtb = ref_leaves[:5]
    rlx = ref_leaves[5] if lx is not None else None
    y64 = multi_lora_linear_reference(rx, w.double(), case.bias.double(), rsa, rsb, rta, rtb, case.seg,
                                      case.shared_scale, case.task_scale, lora_x=rlx)
    want = torch.autograd.grad(y64, ref_leaves, dy.double())
    tol = 1e-5 if not HAS_CUDA else 2e-5
    kt.close(y, y64, rtol=tol, atol=tol, name="y")
    for name, a, b in zip(("dx", "dA0", "dB0", "dA", "dB", "dlora_x"), got, want):
        kt.close(a, b, rtol=tol, atol=tol, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fuse", [True, False])
def test_lora_delta_alone_matches_reference_delta(kt, dtype, fuse):
    """The LoRA term checked on its own: with a zero base weight and no bias the output *is* the LoRA delta, so
    a low-precision check of y is not dominated by the base term (as it is with x W^T in y). Also in fp32 with
    the base weight on: (y - x W^T - b) against the float64 reference delta."""
    case = kt.Case([13, 0, 40], 24, 20, 4, 3, dtype=dtype, device=DEVICE, bias=False)
    case.weight = torch.zeros_like(case.weight)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2}[dtype]
    check_against_reference(kt, case, tol=tol, fuse_shrink=fuse)
    if dtype == torch.float32:
        case = kt.Case([13, 0, 40], 24, 20, 4, 3, dtype=dtype, device=DEVICE, scales=(0.02, 0.01))
        base = torch.nn.functional.linear(case.x.double(), case.weight.double(), case.bias.double())
        delta = multi_lora_linear_triton(*case.args(), fuse_shrink=fuse).double() - base
        delta64 = multi_lora_linear_reference(*case.args(lambda t: t.double())) - base
        assert kt.rel_err(delta64, 0 * delta64) > 0  # the delta is not zero: the check below means something
        err = kt.rel_err(delta, delta64)
        # Output rounding of y (|y| eps) bounds how well the delta can be recovered from y in fp32.
        bound = 4 * torch.finfo(dtype).eps * base.abs().max().item() / delta64.abs().max().item() + 1e-5
        assert kt.within(err, bound), (err, bound)


def _with_dropout_mask(case, p, seed):
    """The reference's view of fused dropout: lora_x = x * keep / (1 - p) with the kernels' Philox mask, as a
    function of x (so dX collects both the base and the LoRA path, as the fused kernels' dX does)."""
    keep = dropout_keep_mask(seed, case.x.shape[0], case.x.shape[1], p, case.x.device)
    assert 0 < keep.float().mean() < 1  # the mask drops some and keeps some: the test can tell
    return keep

    
def test_dropout_mask_statistics():
    """The Philox keep mask: keep rate 1 - p overall, in each column phase mod 4 (the 4 outputs of one Philox
    call) and per row; different seeds and neighbouring rows give different masks; odd widths work."""
    p = 0.3
    keep = dropout_keep_mask(5, 64, 102, p, DEVICE).float()  # deterministic: fixed seeds
    assert keep.shape == (64, 102)
    assert abs(keep.mean().item() - (1 - p)) < 0.02
    for phase in range(4):
        assert abs(keep[:, phase::4].mean().item() - (1 - p)) < 0.04, phase
    assert keep.mean(1).min() > 0.5 and keep.mean(1).max() < 0.9
    assert (keep[1:] != keep[:-1]).float().mean() > 0.3          # rows are not copies of each other
    other = dropout_keep_mask(6, 64, 102, p, DEVICE).float()
    assert (other != keep).float().mean() > 0.3


@pytest.mark.parametrize("base", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_dropout_matches_reference_with_same_mask(kt, base, dtype):
    """LoRA dropout inside the kernels (Philox in the shrink, the dX epilogue and the dA pass) against the
    float64 reference fed lora_x = x * mask / (1 - p) built from ``dropout_keep_mask`` with the same seed;
    a long segment (several row chunks) and gradient routing included."""
    p, seed = 0.3, 1234
    case = kt.Case([40, 0, 11], 21, 19, 3, 2, dtype=dtype, device=DEVICE)
    keep = _with_dropout_mask(case, p, seed)
    mask = kt.grad_rows(case.x.shape[0], "mixed", device=DEVICE)
    y, g = kt.run(multi_lora_linear_triton, case, lora_dropout=p, dropout_seed=seed, base=base, param_grad_rows=mask)

    def ref(x, *args, lora_x=None, param_grad_rows=None):
        return multi_lora_linear_reference(x, *args, lora_x=x * keep.to(x.dtype) / (1 - p),
                                           param_grad_rows=param_grad_rows)
    y64, g64 = kt.run(ref, case, cast=lambda t: t.double(), param_grad_rows=mask)
    tol = {torch.float32: 1e-5 if not HAS_CUDA else 2e-5, torch.float16: 1e-2}[dtype]
    errs = {"y": kt.rel_err(y, y64)} | {k: kt.rel_err(g[k], g64[k]) for k in g64}
    assert g.keys() == g64.keys() and all(kt.within(e, tol) for e in errs.values()), errs
    # Same seed -> same output; another seed -> another mask -> another output (the seed is used).
    y2 = multi_lora_linear_triton(*case.args(), lora_dropout=p, dropout_seed=seed, base=base)
    y3 = multi_lora_linear_triton(*case.args(), lora_dropout=p, dropout_seed=seed + 1, base=base)
    assert torch.equal(y2, y) and not torch.equal(y3, y)


@pytest.mark.parametrize("name", ["mixed_separate_shrink", "empty_segments", "lora_x", "long_segment", "shared_only",
                                  "task_only"])
def test_side_path_cublas_base_matches_reference_fp32(kt, name):
    """base="cublas" (the safe fallback of impl="auto"): cuBLAS/torch for x W^T and dY W, the LoRA terms added by
    the side kernels in place; against the float64 reference, forward and backward."""
    counts, d_in, d_out, r, r0, lx, _ = INTERP_CASES[name]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=torch.float32, device=DEVICE, lora_x=lx)
    check_against_reference(kt, case, tol=1e-5 if not HAS_CUDA else 2e-5, base="cublas")


def test_uncovered_rows_raise(kt):
    """Rows beyond the last offset would get no LoRA term (the old kernel left them unwritten): the Triton path
    and the torch path both refuse such offsets, and decreasing or non-zero-start offsets."""
    case = kt.Case([5, 6], 16, 16, 2, 2, device=DEVICE)
    x, w, b, sa, sb, ta, tb, seg, s0, s1 = case.args()
    for bad in ([0, 5, 10], [0, 7, 5], [1, 5, 11], [0, 5, 12]):
        bad_seg = torch.tensor(bad, device=DEVICE)
        with pytest.raises(ValueError, match="seg_offsets"):
            multi_lora_linear_triton(x, w, b, sa, sb, ta, tb, bad_seg, s0, s1)
        with pytest.raises(ValueError, match="seg_offsets"):
            multi_lora_linear(x, w, b, sa, sb, ta, tb, bad_seg, s0, s1, impl="torch")
    # The check can be skipped by callers that validated once per batch; valid offsets still run.
    kt.close(multi_lora_linear_triton(*case.args(), check_segments=False), multi_lora_linear_reference(*case.args()),
             rtol=1e-5, atol=1e-5, name="y")


_AUTOTUNE_CPU_CODE = """
import torch
from ckf_dist.kernels import multi_lora_linear_reference, segment_offsets
from ckf_dist.kernels import multi_lora_triton as mlt
from ckf_dist.testing import max_rel_err, within_tol
assert mlt._AUTOTUNE and mlt._INTERPRET
mlt.POISON_OUTPUTS = True
g = torch.Generator().manual_seed(0)
T, n, d_in, d_out = 3, 41, 24, 40
seg = segment_offsets(torch.repeat_interleave(torch.arange(T), torch.tensor([9, 0, 32])), T)
mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).requires_grad_()
x, sa, sb, ta, tb = mk(n, d_in), mk(3, d_in, sc=0.2), mk(d_out, 3), mk(T, 2, d_in, sc=0.2), mk(T, d_out, 2)
w, dy = torch.randn(d_out, d_in, generator=g) * 0.2, torch.randn(n, d_out, generator=g)
leaves = [x, sa, sb, ta, tb]
args64 = [t.detach().double().requires_grad_() for t in leaves]
ref = multi_lora_linear_reference(args64[0], w.double(), None, *args64[1:], seg, 2.0, 0.5)
want = torch.autograd.grad(ref, args64, dy.double())
for kw in (dict(base="triton", fuse_shrink=True), dict(base="triton", fuse_shrink=False), dict(base="cublas")):
    y = mlt.multi_lora_linear_triton(x, w, None, sa, sb, ta, tb, seg, 2.0, 0.5, **kw)
    got = torch.autograd.grad(y, leaves, dy)
    for name, a, b in zip(("y", "dx", "dA0", "dB0", "dA", "dB"), (y,) + got, (ref,) + want):
        assert within_tol(max_rel_err(a, b), 1e-5), (kw, name, max_rel_err(a, b))
keys = list(mlt._multi_lora_gemm.cache)
# forward (stride_wk == 1) and backward (stride_wk == d_in) layouts and the in-place side epilogue tuned apart
assert len(keys) == 5, keys
assert all(c.kwargs["BLOCK_M"] == 32 for c in mlt._multi_lora_gemm.cache.values())
print("ok", len(keys))
"""


def test_autotuned_path_forward_backward_cpu():
    """The autotuned launcher (the GPU default) under the interpreter, forward and backward, for the fused,
    separate and side (in-place ACCUMULATE: restore_value must undo the timed runs) variants; the autotuner
    keeps separate entries per layout and variant and uses the config it picked."""
    env = dict(os.environ, CKF_LORA_AUTOTUNE="1", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _AUTOTUNE_CPU_CODE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.parametrize("counts", [[9, 14, 6], [0, 19, 0, 0, 7, 0], [0, 0, 0], [70, 0, 5], [16, 32, 1]])
def test_build_tile_list_matches_the_offset_scan(counts):
    """The batch's tile list (built once with torch ops) lists, per block size, exactly the row tiles the
    kernels' on-device offset scan would find: task by task, never crossing a segment, -1 after the last."""
    from ckf_dist.kernels import segment_offsets
    from ckf_dist.kernels.multi_lora_triton import TILE_BLOCKS, build_tile_list

    T, n = len(counts), sum(counts)
    seg = segment_offsets(torch.repeat_interleave(torch.arange(T), torch.tensor(counts)), T)
    tiles = build_tile_list(seg, n)
    max_tiles = -(-n // 16) + T
    assert tiles.shape == (len(TILE_BLOCKS), 2, max_tiles) and tiles.dtype == torch.int32
    for b, block in enumerate(TILE_BLOCKS):
        want = [(t, lo) for t in range(T) for lo in range(int(seg[t]), int(seg[t + 1]), block)]
        want += [(-1, 0)] * (max_tiles - len(want))
        assert list(zip(tiles[b, 0].tolist(), tiles[b, 1].tolist())) == want, block


@pytest.mark.parametrize("persistent", [None, 3])
@pytest.mark.parametrize("name, base", [("mixed_fused", "triton"), ("empty_segments", "triton"),
                                        ("sixteen_tasks", "triton"), ("long_segment_lora_x", "cublas")])
def test_tile_list_and_persistent_grid_match_reference(kt, monkeypatch, name, base, persistent):
    """The GEMM reading (task, rows) from the batch's tile list, on a normal and on a persistent grid (3
    programs walking all tiles: the loop runs many times), forward and backward, against the reference."""
    from ckf_dist.kernels import multi_lora_triton as mlt

    monkeypatch.setattr(mlt, "PERSISTENT_PROGRAMS", persistent)
    counts, d_in, d_out, r, r0, lx, fuse = INTERP_CASES[name]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=torch.float32, device=DEVICE, lora_x=lx)
    tiles = mlt.build_tile_list(case.seg, case.x.shape[0])
    check_against_reference(kt, case, tol=1e-5 if not HAS_CUDA else 2e-5, fuse_shrink=fuse, base=base, tiles=tiles)
    with pytest.raises(ValueError, match="tiles must be build_tile_list"):
        multi_lora_linear_triton(*case.args(), tiles=tiles[:, :, :-1])


def test_triton_param_grad_rows_through_dispatch_and_3d_input(kt):
    """impl='triton' with a [B, S] mask for [B, S, d] input equals the torch reference on the flattened rows."""
    case = kt.Case([6, 10], 21, 17, 3, 2, device=DEVICE)
    mask = kt.grad_rows(16, "mixed", device=DEVICE)
    x3 = case.x.detach().view(2, 8, 21).requires_grad_()
    args = (case.weight, case.bias, case.shared_a, case.shared_b, case.task_a, case.task_b, case.seg, 2.0, 0.5)
    y = multi_lora_linear(x3, *args, impl="triton", param_grad_rows=mask.view(2, 8))
    got = torch.autograd.grad(y, (x3, case.shared_a, case.task_b), case.dy.view(2, 8, 17))
    x2 = case.x.detach().requires_grad_()
    ref = multi_lora_linear_reference(x2, *args, param_grad_rows=mask)
    want = torch.autograd.grad(ref, (x2, case.shared_a, case.task_b), case.dy)
    kt.close(y.view(16, 17), ref, rtol=1e-5, atol=1e-5, name="y")
    for name, a, b in zip(("dx", "dA_shared", "dB_task"), got, want):
        kt.close(a.reshape(b.shape), b, rtol=1e-5, atol=1e-5, name=name)
    with pytest.raises(ValueError, match="param_grad_rows has 15 entries for 16 rows"):
        multi_lora_linear_triton(case.x, *args, param_grad_rows=mask[:15])


def test_triton_3d_input_no_bias_and_trainable_weight(kt):
    """[B, S, d] inputs, no bias, and the torch fallback for a base weight that does require grad."""
    case = kt.Case([6, 10], 21, 17, 3, 2, device=DEVICE, bias=False)
    case.weight.requires_grad_(True)
    x3 = case.x.detach().view(2, 8, 21).requires_grad_()
    args = (case.weight, None, case.shared_a, case.shared_b, case.task_a, case.task_b, case.seg, 2.0, 0.5)
    y = multi_lora_linear_triton(x3, *args)
    assert y.shape == (2, 8, 17)
    dy = case.dy.view(2, 8, 17)
    gx, gw, gta = torch.autograd.grad(y, (x3, case.weight, case.task_a), dy)
    x2 = case.x.detach().requires_grad_()
    y_ref = multi_lora_linear_reference(x2, *args)
    rx, rw, rta = torch.autograd.grad(y_ref, (x2, case.weight, case.task_a), dy.view(16, 17))
    kt.close(y.view(16, 17), y_ref, rtol=1e-5, atol=1e-5, name="y")
    for name, a, b in (("dx", gx.view(16, 21), rx), ("dW", gw, rw), ("dA_task", gta, rta)):
        kt.close(a, b, rtol=1e-5, atol=1e-5, name=name)


def test_dispatch_and_module(kt):
    """impl='triton' through the package dispatch, and the module against its torch path."""
    case = kt.Case([4, 0, 9], 19, 23, 2, 3, device=DEVICE)
    kt.close(multi_lora_linear(*case.args(), impl="triton"), multi_lora_linear_reference(*case.args()),
             rtol=1e-5, atol=1e-5, name="y (impl=triton)")
    torch.manual_seed(0)
    layer = MultiLoRALinear(19, 23, num_tasks=3, task_rank=2, shared_rank=3, bias=True, impl="triton").to(DEVICE)
    with torch.no_grad():  # B starts at zero; make the adapters matter for the check
        layer.shared_b.normal_()
        layer.task_b.normal_()
    x = case.x.detach()
    y = layer(x, case.seg)
    layer.impl = "torch"
    kt.close(y, layer(x, case.seg), rtol=1e-5, atol=1e-5, name="module y")
    assert not layer.weight.requires_grad and layer.task_a.shape == (3, 2, 19)
    kt.close(multi_lora_linear(*case.args(), impl="side"), multi_lora_linear_reference(*case.args()),
             rtol=1e-5, atol=1e-5, name="y (impl=side)")


def test_module_training_dropout_is_fused_and_replayable(kt):
    """The module in training mode hands its dropout probability to the kernels; the Philox seed comes from
    torch's CPU generator, so reseeding replays the same mask (what checkpoint recomputation relies on)."""
    case = kt.Case([5, 11], 16, 12, 2, 2, device=DEVICE)
    torch.manual_seed(3)
    layer = MultiLoRALinear(16, 12, num_tasks=2, task_rank=2, shared_rank=2, lora_dropout=0.25, impl="triton")
    with torch.no_grad():
        layer.shared_b.normal_()
        layer.task_b.normal_()
    layer.to(DEVICE).train()
    x = case.x.detach()
    torch.manual_seed(7)
    y = layer(x, case.seg)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    keep = dropout_keep_mask(seed, 16, 16, 0.25, DEVICE)
    ref = multi_lora_linear_reference(x, layer.weight, None, layer.shared_a, layer.shared_b, layer.task_a,
                                      layer.task_b, case.seg, layer.shared_scale, layer.task_scale,
                                      lora_x=x * keep / 0.75)
    assert kt.within(kt.rel_err(y, ref), 1e-6), "module y with fused dropout"
    layer.eval()
    assert kt.within(kt.rel_err(layer(x, case.seg), multi_lora_linear_reference(
        x, layer.weight, None, layer.shared_a, layer.shared_b, layer.task_a, layer.task_b, case.seg,
        layer.shared_scale, layer.task_scale)), 1e-6), "module y in eval (no dropout)"


def test_argument_errors(kt):
    case = kt.Case([2, 2], 8, 8, 2, 2, device=DEVICE)
    x, w, b, sa, sb, ta, tb, seg, s0, s1 = case.args()
    with pytest.raises(ValueError, match="both its A and its B"):
        multi_lora_linear_triton(x, w, b, sa, None, ta, tb, seg, s0, s1)
    with pytest.raises(ValueError, match="seg_offsets"):
        multi_lora_linear_triton(x, w, b, sa, sb, ta, tb, seg[:-1], s0, s1)
    with pytest.raises(ValueError, match="either lora_x"):
        multi_lora_linear_triton(x, w, b, sa, sb, ta, tb, seg, s0, s1, lora_x=x, lora_dropout=0.1)
    with pytest.raises(ValueError, match="base="):
        multi_lora_linear_triton(x, w, b, sa, sb, ta, tb, seg, s0, s1, base="cutlass")
    # No adapters at all: plain linear.
    kt.close(multi_lora_linear_triton(x, w, b, None, None, None, None, None, s0, s1),
             torch.nn.functional.linear(x, w, b), rtol=1.3e-6, atol=1e-5, name="plain linear")


# --------------------------------------------------------------------------------------------------------
# TMA descriptor loads of the base GEMM (opt-in: tma=True / CKF_LORA_TMA=1)
# --------------------------------------------------------------------------------------------------------
class _GemmLaunchSpy:
    """Stands in for ``_multi_lora_gemm_kernel`` (the launcher the interpreter and the GPU tests use with
    autotuning off): records the TMA and W_K_CONTIG constexprs of every GEMM launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((kwargs["TMA"], kwargs["W_K_CONTIG"], kwargs["ACCUMULATE"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def gemm_spy(monkeypatch):
    from ckf_dist.kernels import multi_lora_triton as mlt

    if mlt._AUTOTUNE:
        pytest.skip("the spy wraps the non-autotuned launcher")
    spy = _GemmLaunchSpy(mlt._multi_lora_gemm_kernel)
    monkeypatch.setattr(mlt, "_multi_lora_gemm_kernel", spy)
    return spy


# Hidden sizes multiples of 8 (16-byte rows in fp16: TMA-eligible) but not of the interpreter's blocks (16/32),
# so the descriptor's zero padding covers the K, column and row tails.
TMA_CASES = {  # name: (counts, d_in, d_out, r, r0, lora_x, fuse_shrink, dropout)
    "fused": ([9, 14, 6], 40, 56, 5, 3, False, True, 0.0),
    "separate_dropout": ([0, 21, 0, 7], 24, 40, 3, 2, False, False, 0.25),
    "lora_x_long_segment": ([70, 3], 24, 40, 4, 0, True, None, 0.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(TMA_CASES))
def test_tma_loads_match_reference(kt, gemm_spy, name, dtype):
    """tma=True: both base GEMMs (forward x W^T, W read K-contiguous; backward dY W, W read C-contiguous) load
    their tiles through tensor descriptors, forward and backward against the float64 reference (outputs
    poisoned); fused shrink, separate shrink with fused dropout, a separate lora_x over several row chunks."""
    counts, d_in, d_out, r, r0, lx, fuse, p = TMA_CASES[name]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=dtype, device=DEVICE, lora_x=lx)
    tol = (1e-5 if not HAS_CUDA else 2e-5) if dtype == torch.float32 else 1e-2
    if p:  # fused dropout: the reference is fed lora_x = x * keep / (1 - p) with the kernels' Philox mask
        seed = 5
        keep = _with_dropout_mask(case, p, seed)
        y, g = kt.run(multi_lora_linear_triton, case, fuse_shrink=fuse, lora_dropout=p, dropout_seed=seed, tma=True)

        def ref(x, *args, lora_x=None, param_grad_rows=None):
            return multi_lora_linear_reference(x, *args, lora_x=x * keep.to(x.dtype) / (1 - p))
        y64, g64 = kt.run(ref, case, cast=lambda t: t.double())
        errs = {"y": kt.rel_err(y, y64)} | {k: kt.rel_err(g[k], g64[k]) for k in g64}
        assert g.keys() == g64.keys() and all(kt.within(e, tol) for e in errs.values()), errs
    else:
        check_against_reference(kt, case, tol=tol, fuse_shrink=fuse, tma=True)
    assert (True, True, False) in gemm_spy.launches, gemm_spy.launches   # forward x W^T through TMA
    assert (True, False, False) in gemm_spy.launches, gemm_spy.launches  # backward dY W through TMA


def test_tma_with_tile_list_persistent_grid_and_env_default(kt, gemm_spy, monkeypatch):
    """TMA on a persistent grid walking the batch's tile list (descriptors built once per program); tma=None
    follows ``USE_TMA`` (env CKF_LORA_TMA=1)."""
    from ckf_dist.kernels import multi_lora_triton as mlt

    monkeypatch.setattr(mlt, "PERSISTENT_PROGRAMS", 3)
    monkeypatch.setattr(mlt, "USE_TMA", True)
    case = kt.Case([0, 19, 0, 0, 7, 0], 32, 24, 4, 2, device=DEVICE)
    tiles = mlt.build_tile_list(case.seg, case.x.shape[0])
    check_against_reference(kt, case, tol=1e-5 if not HAS_CUDA else 2e-5, tiles=tiles)
    assert gemm_spy.launches and all(t for t, _, _ in gemm_spy.launches), gemm_spy.launches


def test_tma_falls_back_to_pointer_loads(kt, gemm_spy):
    """Operands TMA cannot describe keep the pointer loads and stay correct: rows of 37 fp32 (148 bytes, not
    16-byte aligned), a column-strided x, an x view at a 4-byte offset; the cuBLAS side path never uses it."""
    from ckf_dist.kernels import multi_lora_triton as mlt

    case = kt.Case([9, 14, 6], 37, 45, 5, 3, device=DEVICE)
    check_against_reference(kt, case, tol=1e-5 if not HAS_CUDA else 2e-5, fuse_shrink=True, tma=True)
    assert gemm_spy.launches and not any(t for t, _, _ in gemm_spy.launches), gemm_spy.launches
    w = torch.randn(24, 40, device=DEVICE)
    wide = torch.randn(8, 81, device=DEVICE)
    assert mlt._tma_ok(wide[:, 1:41:1].contiguous(), w, (w.stride(1), w.stride(0))) is True
    assert mlt._tma_ok(wide[:, :80:2], w, (w.stride(1), w.stride(0))) is None    # column stride 2
    assert mlt._tma_ok(wide[:, 1:41], w, (w.stride(1), w.stride(0))) is None     # 4-byte offset, 324-byte rows
    wcm = w.t().contiguous().t()  # column-major W: its transpose is row-major, TMA reads it as [K, C]
    assert mlt._tma_ok(wide[:, :40].contiguous(), wcm, (wcm.stride(1), wcm.stride(0))) is False
    ws = torch.randn(24, 80, device=DEVICE)[:, ::2]  # no unit stride
    assert mlt._tma_ok(wide[:, :40].contiguous(), ws, (ws.stride(1), ws.stride(0))) is None
    gemm_spy.launches.clear()
    case = kt.Case([9, 14, 6], 40, 56, 5, 3, device=DEVICE)
    check_against_reference(kt, case, tol=1e-5 if not HAS_CUDA else 2e-5, base="cublas", tma=True)
    assert gemm_spy.launches and not any(t for t, _, _ in gemm_spy.launches), gemm_spy.launches


# --------------------------------------------------------------------------------------------------------
# GPU tests
# --------------------------------------------------------------------------------------------------------
GPU_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
GPU_SHAPES = [  # (counts, d_in, d_out, r, r0)
    ([300, 0, 211, 513], 1000, 1001, 16, 16),    # odd sizes, an empty segment
    ([1024] * 4, 4096, 4096, 16, 16),            # the benchmark shape, reduced rows
    ([257, 3, 0, 700, 1, 90, 0, 64], 2048, 2048, 8, 8),
    ([97] * 16, 512, 1536, 4, 8),                # T = 16
    ([129, 0, 1], 8192, 300, 64, 64),            # widest hidden size, largest ranks
    ([640, 384], 4096, 11008, 16, 0),            # 7B MLP up-projection, task-only
    ([0, 0, 5], 130, 70, 1, 1),                  # rank 1, a handful of rows
]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", range(len(GPU_SHAPES)))
@pytest.mark.parametrize("variant", ["auto", "fused", "separate", "lora_x", "side", "side_lora_x"])
def test_triton_gpu_grid(kt, dtype, shape, variant):
    counts, d_in, d_out, r, r0 = GPU_SHAPES[shape]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=dtype, device="cuda", lora_x=variant.endswith("lora_x"))
    fuse = {"fused": True, "separate": False}.get(variant)
    check_against_reference(kt, case, tol=GPU_TOL[dtype], fuse_shrink=fuse,
                            base="cublas" if variant.startswith("side") else "triton")


BENCH_SHAPES = [  # the four shapes of bench_multi_lora: (tokens, d_in, d_out, r, T); shared rank = r
    (16384, 4096, 4096, 16, 4), (16384, 2048, 2048, 8, 4), (16384, 4096, 4096, 16, 8), (16384, 4096, 11008, 16, 4),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", range(len(BENCH_SHAPES)))
@pytest.mark.parametrize("base", ["triton", "cublas"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_benchmark_shapes_gpu(kt, dtype, shape, base, dropout):
    """The benchmark's shapes at full size, both bases, with and without fused dropout, against the float64
    reference (fed the kernels' Philox mask); uneven task sizes with one empty task."""
    tokens, d_in, d_out, r, T = BENCH_SHAPES[shape]
    counts = [tokens // 2, tokens // 4, 0] + [0] * (T - 4) + [tokens - tokens // 2 - tokens // 4]
    case = kt.Case(counts, d_in, d_out, r, r, dtype=dtype, device="cuda")
    seed = 99
    if dropout:
        keep = dropout_keep_mask(seed, tokens, d_in, dropout, "cuda")

        def ref(x, *args, lora_x=None, param_grad_rows=None):
            return multi_lora_linear_reference(x, *args, lora_x=x * keep.to(x.dtype) / (1 - dropout))
    else:
        ref = multi_lora_linear_reference
    y, g = kt.run(multi_lora_linear_triton, case, base=base, lora_dropout=dropout, dropout_seed=seed)
    y64, g64 = kt.run(ref, case, cast=lambda t: t.double())
    errs = {"y": kt.rel_err(y, y64)} | {k: kt.rel_err(g[k], g64[k]) for k in g64}
    # The LoRA delta alone (y - x W^T - b), relative to the delta: the y check is dominated by the base term.
    base64 = torch.nn.functional.linear(case.x.double(), case.weight.double(), case.bias.double())
    errs["delta"] = kt.rel_err(y.double() - base64, y64 - base64)
    tol = GPU_TOL[dtype]
    bound = {"delta": tol + 4 * torch.finfo(dtype).eps * base64.abs().max().item() / (y64 - base64).abs().max().item()}
    bad = {k: e for k, e in errs.items() if not kt.within(e, bound.get(k, tol))}
    assert not bad, (bad, bound)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [0, 1, 5])
def test_triton_param_grad_rows_gpu_bf16(kt, shape):
    """Gradient routing at real shapes in bf16 (half the rows train the adapters) against the float64 reference."""
    counts, d_in, d_out, r, r0 = GPU_SHAPES[shape]
    case = kt.Case(counts, d_in, d_out, r, r0, dtype=torch.bfloat16, device="cuda")
    mask = kt.grad_rows(case.x.shape[0], "mixed", device="cuda")
    errs = check_against_reference(kt, case, tol=GPU_TOL[torch.bfloat16], param_grad_rows=mask)
    assert set(errs) >= {"y", "x", "task_a", "task_b"}


@gpu
@needs_cuda
def test_no_host_sync_in_forward_backward(kt):
    """seg_offsets stays on the device: the Triton path must not synchronise with the host."""
    case = kt.Case([500, 0, 300], 512, 768, 16, 16, dtype=torch.bfloat16, device="cuda")
    mask = kt.grad_rows(800, "mixed", device="cuda")
    from ckf_dist.kernels.multi_lora_triton import build_tile_list

    tiles = build_tile_list(case.seg, 800)
    for kw in (dict(), dict(base="cublas"), dict(lora_dropout=0.1), dict(base="cublas", lora_dropout=0.1),
               dict(param_grad_rows=mask), dict(tiles=tiles)):
        kt.run(multi_lora_linear_triton, case, **kw)  # compile first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            kt.run(multi_lora_linear_triton, case, **kw)  # seg_offsets check included (async assert)
            build_tile_list(case.seg, 800)  # the per-batch tile list: device ops only
            kt.run(multi_lora_linear, case, impl="auto", **{k: v for k, v in kw.items() if k != "base"})
        finally:
            torch.cuda.set_sync_debug_mode("default")


@gpu
@needs_cuda
def test_autotuned_path_gpu():
    """The autotuned launcher (the default outside tests) on one bf16 shape, in a fresh process."""
    code = (
        "import torch\n"
        "from ckf_dist.kernels import multi_lora_linear_reference, segment_offsets\n"
        "from ckf_dist.kernels.multi_lora_triton import multi_lora_linear_triton\n"
        "from ckf_dist.testing import max_rel_err, within_tol\n"
        "torch.manual_seed(0); d = 'cuda'; T = 4\n"
        "ids = torch.sort(torch.randint(0, T, (3000,), device=d))[0]; seg = segment_offsets(ids, T)\n"
        "x = torch.randn(3000, 1024, device=d, dtype=torch.bfloat16)\n"
        "w = torch.randn(1536, 1024, device=d, dtype=torch.bfloat16) / 32\n"
        "sa, sb = torch.randn(16, 1024, device=d, dtype=torch.bfloat16) / 32, torch.randn(1536, 16, device=d, dtype=torch.bfloat16)\n"
        "ta, tb = torch.randn(T, 16, 1024, device=d, dtype=torch.bfloat16) / 32, torch.randn(T, 1536, 16, device=d, dtype=torch.bfloat16)\n"
        "args = (x, w, None, sa, sb, ta, tb, seg, 2.0, 4.0)\n"
        "leaves = [x, sa, sb, ta, tb]\n"
        "for t in leaves: t.requires_grad_()\n"
        "dy = torch.randn(3000, 1536, device=d, dtype=torch.bfloat16)\n"
        "args64 = [a.detach().double().requires_grad_(a.requires_grad) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]\n"
        "ref = multi_lora_linear_reference(*args64)\n"
        "want = torch.autograd.grad(ref, [args64[i] for i in (0, 3, 4, 5, 6)], dy.double())\n"
        "for fuse, base in ((None, 'triton'), (True, 'triton'), (False, 'triton'), (None, 'cublas')):\n"
        "    y = multi_lora_linear_triton(*args, fuse_shrink=fuse, base=base)\n"
        "    got = torch.autograd.grad(y, leaves, dy)\n"
        "    for name, a, b in zip(('y', 'dx', 'dA0', 'dB0', 'dA', 'dB'), (y,) + got, (ref,) + want):\n"
        "        err = max_rel_err(a, b)  # inf on NaN/inf\n"
        "        assert within_tol(err, 4e-2), (fuse, name, err)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CKF_LORA_AUTOTUNE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tma_benchmark_shape_gpu(kt, gemm_spy, dtype):
    """tma=True at the first benchmark shape (16384 x 4096 -> 4096, r16, T4) against the float64 reference: the
    device-side descriptors (scratch from triton.set_allocator) in both GEMM layouts, forward and backward."""
    from ckf_dist.kernels.multi_lora_triton import triton_base_gemm

    tokens, d_in, d_out, r, T = BENCH_SHAPES[0]
    counts = [tokens // 2, tokens // 4, 0] + [0] * (T - 4) + [tokens - tokens // 2 - tokens // 4]
    case = kt.Case(counts, d_in, d_out, r, r, dtype=dtype, device="cuda")
    check_against_reference(kt, case, tol=GPU_TOL[dtype], tma=True)
    assert (True, True, False) in gemm_spy.launches and (True, False, False) in gemm_spy.launches
    for layout, a, want in (("fwd", case.x.detach(), case.x.detach() @ case.weight.t()),
                            ("bwd", case.dy, case.dy @ case.weight)):
        kt.close(triton_base_gemm(a, case.weight, layout, tma=True).float(), want.float(), rtol=2e-2, atol=2e-2,
                 name=f"base GEMM {layout}")
