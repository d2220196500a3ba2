"""Benchmark: multi-task LoRA linear, forward + backward, against the base linear, the ceilings and the alternatives.

    python -m ckf_dist.kernels.bench_multi_lora                        # or: python kernels/bench_multi_lora.py
    python kernels/bench_multi_lora.py --dtype bf16 --json bench.json  # then: python -m ckf_dist.kernels.build_win_table bench.json
    TRITON_INTERPRET=1 python kernels/bench_multi_lora.py --tiny       # CPU smoke test (interpreter; not a figure)

Per shape, in one run (frozen base weight; x and all adapters require grad; dY fixed):
  ceilings             copy bandwidth (one read + one write of x) and cuBLAS TFLOP/s of the base forward; from
                       them P = the time of one pass over an [N, d] tensor, the unit of the kernels' cost model
  GEMM parity          the Triton GEMM of the fused path without LoRA vs cuBLAS, forward (x W^T) and backward (dY W),
                       with pointer loads ("fwd", "bwd") and with TMA descriptor loads ("fwd tma", "bwd tma")
  base linear          x W^T alone, forward + dX (the floor every LoRA variant is reported against)
  per-task index loop  shared LoRA + for each task: nonzero(task_ids == t) -> index_select -> LoRA -> index_add
  grouped_mm           torch grouped_mm over task-sorted rows (shrink + expand as two grouped GEMMs)
  concat + mask        all adapters as one rank-(r0 + T r) LoRA, non-own task columns of h zeroed
  torch reference      impl="torch" (one GEMM pair per task segment; syncs the host)
  triton fused/separate the fused path (Triton base GEMM, expand in its epilogue), shrink in / out of the K loop
  triton persistent    "separate" on a persistent grid (2 programs per SM walking the batch's tile list)
  triton tma           "separate" with the base GEMMs' x/dY and W tiles loaded through TMA descriptors (tma=True)
  triton side          cuBLAS base + the Triton LoRA side kernels (impl="auto"'s fallback)
  triton auto          impl="auto" (whatever the dispatch picks for this shape)
Timing: every method is timed ``--rounds`` times (default 3), the rounds interleaved (base, m1, m2, ..., base,
m1, ...) so that clock and thermal drift hit all alike; each timing is a median (do_bench on the GPU); printed:
the median over rounds, the spread (max - min) / median, the ratio to the base linear's median. Errors: max
normwise relative error of y and of every gradient against an fp32 reference computed from the same inputs
(never against the Triton output), and of the LoRA delta (y - x W^T) alone. ``--json``: one row per (shape,
method) with device, dtype, shape, median_ms, spread, errors: the input of ``dispatch.write_win_table``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (name, tokens, d_in, d_out, r, T); shared rank = r
    ("d4096 r16 T4", 16384, 4096, 4096, 16, 4),
    ("d2048 r8 T4", 16384, 2048, 2048, 8, 4),
    ("d4096 r16 T8", 16384, 4096, 4096, 16, 8),
    ("7B MLP 4096->11008 r16 T4", 16384, 4096, 11008, 16, 4),
]
TINY_SHAPES = [("tiny", 40, 24, 32, 4, 3)]  # CPU / interpreter smoke test
GRAD_NAMES = ("x", "shared_a", "shared_b", "task_a", "task_b")


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def make_problem(tokens, d_in, d_out, r, T, dtype, seed=0, device="cuda"):
    from ckf_dist.kernels import segment_offsets

    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.sort(torch.randint(0, T, (tokens,), device=device, generator=g))[0]
    seg = segment_offsets(ids, T)

    def mk(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype).requires_grad_(grad)

    p = dict(
        x=mk(tokens, d_in), weight=mk(d_out, d_in, scale=d_in ** -0.5, grad=False),
        shared_a=mk(r, d_in, scale=d_in ** -0.5), shared_b=mk(d_out, r, scale=0.1),
        task_a=mk(T, r, d_in, scale=d_in ** -0.5), task_b=mk(T, d_out, r, scale=0.1),
    )
    p.update(task_ids=ids, seg=seg, s0=4.0, s1=4.0, dy=mk(tokens, d_out, grad=False), dropout=0.0, seed=1234)
    return p


def base_linear(p):
    return F.linear(p["x"], p["weight"])


def _lora_input(p):
    """x for the torch variants, with dropout (the Triton paths use their fused Philox dropout instead)."""
    if p["dropout"] > 0:
        return F.dropout(p["x"], p["dropout"], training=True)
    return p["x"]


def _shared(p, lx):
    return p["s0"] * F.linear(F.linear(lx, p["shared_a"]), p["shared_b"])


def index_loop(p):
    lx = _lora_input(p)
    y = base_linear(p) + _shared(p, lx)
    for t in range(p["task_a"].shape[0]):
        idx = torch.nonzero(p["task_ids"] == t).squeeze(1)  # host sync, as in the naive implementation
        xt = lx.index_select(0, idx)
        y = y.index_add(0, idx, p["s1"] * F.linear(F.linear(xt, p["task_a"][t]), p["task_b"][t]))
    return y


def grouped_mm(p):
    gmm = _grouped_mm_fn()
    lx = _lora_input(p)
    offs = p["seg"][1:].to(torch.int32)  # cumulative group ends
    h = gmm(lx, p["task_a"].transpose(1, 2), offs=offs)           # [N, r]
    lora = gmm(h, p["task_b"].transpose(1, 2), offs=offs)         # [N, d_out]
    return base_linear(p) + _shared(p, lx) + p["s1"] * lora


def concat_mask(p):
    T, r, d_in = p["task_a"].shape
    r0 = p["shared_a"].shape[0]
    a_all = torch.cat([p["shared_a"], p["task_a"].reshape(T * r, d_in)], 0)                 # [r0 + T r, d_in]
    b_all = torch.cat([p["s0"] * p["shared_b"], p["s1"] * p["task_b"].permute(1, 0, 2).reshape(-1, T * r)], 1)
    dev = p["x"].device
    col_task = torch.cat([torch.full((r0,), -1, device=dev), torch.arange(T, device=dev).repeat_interleave(r)])
    mask = (col_task[None, :] == -1) | (col_task[None, :] == p["task_ids"][:, None])          # [N, r0 + T r]
    h = F.linear(_lora_input(p), a_all) * mask.to(p["x"].dtype)
    return base_linear(p) + F.linear(h, b_all)


def _args(p):
    return (p["x"], p["weight"], None, p["shared_a"], p["shared_b"], p["task_a"], p["task_b"], p["seg"], p["s0"],
            p["s1"])


def torch_reference(p):
    from ckf_dist.kernels import multi_lora_linear

    return multi_lora_linear(*_args(p), impl="torch", lora_dropout=p["dropout"])


def triton_kernel(fuse=None, base="triton", persistent=False, tma=False):
    """A Triton variant as the model calls it: the batch's tile list built once (``p["tiles"]``)."""
    def run(p):
        from ckf_dist.kernels import multi_lora_triton as mlt

        saved = mlt.PERSISTENT_PROGRAMS
        if persistent:  # a persistent grid of 2 programs per SM (3 on a CPU: the loop still runs)
            mlt.PERSISTENT_PROGRAMS = (2 * torch.cuda.get_device_properties(0).multi_processor_count
                                       if p["x"].is_cuda else 3)
        try:
            return mlt.multi_lora_linear_triton(*_args(p), fuse_shrink=fuse, base=base, lora_dropout=p["dropout"],
                                                dropout_seed=p["seed"], tiles=p["tiles"], tma=tma)
        finally:
            mlt.PERSISTENT_PROGRAMS = saved
    return run


def triton_auto(p):
    from ckf_dist.kernels import multi_lora_linear

    return multi_lora_linear(*_args(p), impl="auto", lora_dropout=p["dropout"])


METHODS = [
    ("base linear", base_linear),
    ("per-task index loop", index_loop),
    ("grouped_mm", grouped_mm),
    ("concat + mask", concat_mask),
    ("torch reference", torch_reference),
    ("triton fused", triton_kernel(True)),
    ("triton separate", triton_kernel(False)),
    ("triton persistent", triton_kernel(False, persistent=True)),
    ("triton tma", triton_kernel(False, tma=True)),
    ("triton side", triton_kernel(None, "cublas")),
    ("triton auto", triton_auto),
]
TRITON_METHODS = {"triton fused", "triton separate", "triton persistent", "triton tma", "triton side", "triton auto"}


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------
def time_ms(fn, device, warmup_ms, rep_ms, grad_to_none=None) -> float:
    """Median ms of ``fn()``: triton's do_bench on the GPU (L2 flushed), wall clock over a few calls on a CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()
    times = []
    for _ in range(2):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd_step(fn, p):
    grads = [p[k] for k in GRAD_NAMES]

    def step():
        fn(p).backward(p["dy"])
    return step, grads


def interleaved(methods, p, device, rounds, warmup_ms, rep_ms) -> dict:
    """{label: [ms of each round]}: every round times every method once, in order (interleaved)."""
    out = {label: [] for label, _ in methods}
    for _ in range(rounds):
        for label, fn in methods:
            step, grads = fwd_bwd_step(fn, p)
            out[label].append(time_ms(step, device, warmup_ms, rep_ms, grad_to_none=grads))
    return out


def summary(times: list[float]) -> tuple[float, float]:
    """(median, spread = (max - min) / median) of the rounds."""
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med if med > 0 else float("nan")


def ceilings(p, device, warmup_ms, rep_ms) -> dict:
    """Copy bandwidth (GB/s), cuBLAS base-forward TFLOP/s and P (ms per pass over x) measured on this problem."""
    x = p["x"].detach()
    dst = torch.empty_like(x)
    copy_ms = time_ms(lambda: dst.copy_(x), device, warmup_ms, rep_ms)
    bytes_moved = 2 * x.numel() * x.element_size()
    w = p["weight"].detach()
    with torch.no_grad():
        gemm_ms = time_ms(lambda: F.linear(x, w), device, warmup_ms, rep_ms)
    flops = 2 * x.shape[0] * w.shape[0] * w.shape[1]
    return dict(copy_gbps=bytes_moved / copy_ms / 1e6, cublas_tflops=flops / gemm_ms / 1e9,
                pass_ms=copy_ms / 2, cublas_fwd_ms=gemm_ms)


def gemm_parity(p, device, warmup_ms, rep_ms) -> dict:
    """Triton GEMM (no LoRA) vs cuBLAS, both layouts, pointer and TMA loads:
    {"fwd"|"bwd"|"fwd tma"|"bwd tma": (triton_ms, cublas_ms)}."""
    from ckf_dist.kernels.multi_lora_triton import triton_base_gemm

    x, w, dy = p["x"].detach(), p["weight"].detach(), p["dy"].detach()
    out = {}
    with torch.no_grad():
        for layout, a, ref in (("fwd", x, lambda: F.linear(x, w)), ("bwd", dy, lambda: dy @ w)):
            cub = time_ms(ref, device, warmup_ms, rep_ms)
            for tma in (False, True):
                tri = time_ms(lambda tma=tma: triton_base_gemm(a, w, layout, tma=tma), device, warmup_ms, rep_ms)
                out[layout + (" tma" if tma else "")] = (tri, cub)
    return out


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------
def errors_vs_fp32(fn, p) -> dict:
    """Normwise relative errors of y, the LoRA delta (y - x W^T) and each gradient against the fp32 reference
    on the same inputs. With dropout the reference is fed the method's own mask where it is known (the Triton
    paths' Philox mask); torch variants draw their own masks, so their errors are not reported then."""
    from ckf_dist.kernels import multi_lora_linear_reference
    from ckf_dist.testing import max_rel_err

    leaves = [p[k] for k in GRAD_NAMES]
    y = fn(p)
    got = torch.autograd.grad(y, leaves, p["dy"], allow_unused=True) if fn is not base_linear else None
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    x32, w32 = f32[0], p["weight"].detach().float()
    lx = None
    if p["dropout"] > 0:
        from ckf_dist.kernels.multi_lora_triton import dropout_keep_mask

        keep = dropout_keep_mask(p["seed"], x32.shape[0], x32.shape[1], p["dropout"], x32.device)
        lx = x32 * keep.float() / (1 - p["dropout"])
    base32 = F.linear(x32.detach(), w32)
    if fn is base_linear:
        return {"y": max_rel_err(y, base32)}
    ref = multi_lora_linear_reference(x32, w32, None, *f32[1:], p["seg"], p["s0"], p["s1"], lora_x=lx)
    want = torch.autograd.grad(ref, f32, p["dy"].float())
    errs = {"y": max_rel_err(y, ref), "delta": max_rel_err(y.float() - base32, ref.detach() - base32)}
    for name, a, b in zip(GRAD_NAMES, got, want):
        errs[f"d{name}"] = max_rel_err(a, b) if a is not None else float("inf")
    return errs


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 (tiny: fp32)")
    ap.add_argument("--tokens", type=int, default=None, help="override the token count of every shape")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (Triton: fused Philox; torch: F.dropout)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per method")
    ap.add_argument("--warmup", type=int, default=25, help="ms of warm-up per timing (do_bench)")
    ap.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per timing (do_bench)")
    ap.add_argument("--methods", default=None, help="comma list of method labels (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU (TRITON_INTERPRET=1 for the Triton rows)")
    ap.add_argument("--json", default=None, help="write the rows (input of dispatch.write_win_table) here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        sys.exit("bench_multi_lora: no CUDA device found; this benchmark times GPU kernels (--tiny: CPU smoke test).")
    device = "cpu" if tiny else "cuda"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    dtype_name = args.dtype or ("fp32" if tiny else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    import triton

    methods = [(label, fn) for label, fn in METHODS
               if (args.methods is None or label in args.methods.split(","))
               and (label not in TRITON_METHODS or device == "cuda" or interpret)
               and (fn is not grouped_mm or (_grouped_mm_fn() is not None and device == "cuda"))]
    if not methods or methods[0][0] != "base linear":
        methods = [("base linear", base_linear)] + [m for m in methods if m[0] != "base linear"]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU" + (" (TRITON_INTERPRET=1)" if interpret else "")
    header = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), dtype=dtype_name,
                  dropout=args.dropout, rounds=args.rounds, autotune=os.environ.get("CKF_LORA_AUTOTUNE", "1"))
    print(f"# multi-task LoRA linear, forward + backward, {dtype_name}, dropout {args.dropout:g}, frozen base weight, "
          f"shared rank = task rank; {args.rounds} interleaved rounds, medians")
    print(f"# device: {gpu} | torch {torch.__version__} | triton {triton.__version__} | {header['date']}")
    if tiny:
        print("# --tiny: a smoke test of the script, NOT a measurement")
    rows, shapes_out = [], []
    from ckf_dist.kernels.dispatch import rank_pad
    from ckf_dist.kernels.multi_lora_triton import chosen_gemm_configs

    for name, tokens, d_in, d_out, r, T in (TINY_SHAPES if tiny else SHAPES):
        tokens = args.tokens or tokens
        p = make_problem(tokens, d_in, d_out, r, T, dtype, device=device)
        p["dropout"] = args.dropout
        if device == "cuda" or interpret:
            from ckf_dist.kernels.multi_lora_triton import build_tile_list

            p["tiles"] = build_tile_list(p["seg"], tokens)  # once per batch, as TaskSegments does
        print(f"\n## {name}: tokens {tokens}, d_in {d_in}, d_out {d_out}, r0 = r = {r}, T {T}")
        shape = dict(device=gpu, dtype=dtype_name, tokens=tokens, d_in=d_in, d_out=d_out, r_pad=rank_pad(r, r),
                     tasks=T, dropout=args.dropout)
        ceil = ceilings(p, device, args.warmup, args.rep)
        print(f"# ceilings: copy {ceil['copy_gbps']:.0f} GB/s (P = one pass over x = {ceil['pass_ms']:.3f} ms), "
              f"cuBLAS x W^T {ceil['cublas_tflops']:.1f} TFLOP/s ({ceil['cublas_fwd_ms']:.3f} ms)")
        parity = {}
        if device == "cuda" or interpret:
            parity = gemm_parity(p, device, args.warmup, args.rep)
            for layout, (tri, cub) in parity.items():
                print(f"# Triton GEMM without LoRA, {layout} ({'x W^T' if layout.startswith('fwd') else 'dY W'}): "
                      f"{tri:.3f} ms vs cuBLAS {cub:.3f} ms = {100 * cub / tri:.0f}% of cuBLAS (go/no-go: >= 95%)")
        errs = {}
        for label, fn in methods:
            try:
                errs[label] = errors_vs_fp32(fn, p)
            except Exception as exc:  # keep the table going (e.g. grouped_mm unsupported on this GPU/dtype)
                errs[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"}
        ok = [(label, fn) for label, fn in methods if "error" not in errs[label]]
        times = interleaved(ok, p, device, args.rounds, args.warmup, args.rep)
        base_ms = summary(times["base linear"])[0]
        print(f"{'method':<22}{'ms':>10}{'spread':>9}{'x base':>10}{'err y':>9}{'err delta':>10}{'err grads':>10}")
        for label, _ in methods:
            e = errs[label]
            if "error" in e:
                print(f"{label:<22}  failed: {e['error']}")
                rows.append(shape | dict(method=label, error=e["error"]))
                continue
            med, spread = summary(times[label])
            grad_err = max((v for k, v in e.items() if k.startswith("d") and k != "delta"), default=float("nan"))
            # with dropout, only the explicit Triton rows use the seed the reference's mask is built from
            torch_dropout = args.dropout > 0 and (label not in TRITON_METHODS or label == "triton auto") \
                and label != "base linear"
            # torch variants with dropout draw their own masks: no comparable reference
            fmt = (lambda v: "(mask)") if torch_dropout else (lambda v: "-" if v != v else f"{v:.1e}")
            print(f"{label:<22}{med:>10.3f}{100 * spread:>8.1f}%{med / base_ms:>9.2f}x{fmt(e['y']):>9}"
                  f"{fmt(e.get('delta', float('nan'))):>10}{fmt(grad_err):>10}")
            rows.append(shape | dict(method=label, median_ms=med, spread=spread, ms_rounds=times[label],
                                     ratio_to_base=med / base_ms, errors=None if torch_dropout else e))
        configs = chosen_gemm_configs()
        if configs:
            print("# autotuned GEMM configs so far (key: K, C, R_PAD, fuse, split, accumulate, dropout, stride_wk, "
                  "token bucket, dtypes):")
            for key, cfg in configs.items():
                print(f"#   {key}: {cfg}")
        shapes_out.append(shape | dict(ceilings=ceil, gemm_parity=parity, configs=configs))
        del p
        if device == "cuda":
            torch.cuda.empty_cache()
    out = dict(header, rows=rows, shapes=shapes_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"# rows written to {args.json} (win table: python -m ckf_dist.kernels.build_win_table {args.json})")
    return out


if __name__ == "__main__":
    main()
