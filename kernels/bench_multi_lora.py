"""Benchmark: multi-task LoRA linear, forward + backward, against the base linear and the usual alternatives.

    python -m ckf_dist.kernels.bench_multi_lora            # or: python kernels/bench_multi_lora.py
    python kernels/bench_multi_lora.py --dtype bf16 --tokens 16384

Timed per shape, in one run (bf16 by default, frozen base weight, x and all adapters require grad):
  base linear          x W^T alone (the floor every LoRA variant is reported against)
  per-task index loop  shared LoRA + for each task: nonzero(task_ids == t) -> index_select -> LoRA -> index_add
  grouped_mm           torch grouped_mm over task-sorted rows (shrink + expand as two grouped GEMMs)
  concat + mask        all adapters as one rank-(r0 + T r) LoRA, non-own task columns of h zeroed
  triton (auto)        ckf_dist.kernels.multi_lora_linear_triton, heuristic shrink placement
  triton fused/separate the same with the shrink forced into / out of the GEMM (to tune the heuristic)
Columns: ms per forward+backward, ratio to the base linear, max |y - y_triton| / max |y_triton| (sanity).
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

SHAPES = [  # (name, tokens, d_in, d_out, r, T); shared rank = r
    ("d4096 r16 T4", 16384, 4096, 4096, 16, 4),
    ("d2048 r8 T4", 16384, 2048, 2048, 8, 4),
    ("d4096 r16 T8", 16384, 4096, 4096, 16, 8),
    ("7B MLP 4096->11008 r16 T4", 16384, 4096, 11008, 16, 4),
]


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


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
    p.update(task_ids=ids, seg=seg, s0=4.0, s1=4.0, dy=mk(tokens, d_out, grad=False))
    return p


def base_linear(p):
    return F.linear(p["x"], p["weight"])


def _shared(p):
    return p["s0"] * F.linear(F.linear(p["x"], p["shared_a"]), p["shared_b"])


def index_loop(p):
    y = base_linear(p) + _shared(p)
    for t in range(p["task_a"].shape[0]):
        idx = torch.nonzero(p["task_ids"] == t).squeeze(1)  # host sync, as in the naive implementation
        xt = p["x"].index_select(0, idx)
        y = y.index_add(0, idx, p["s1"] * F.linear(F.linear(xt, p["task_a"][t]), p["task_b"][t]))
    return y


def grouped_mm(p):
    gmm = _grouped_mm_fn()
    offs = p["seg"][1:].to(torch.int32)  # cumulative group ends
    h = gmm(p["x"], p["task_a"].transpose(1, 2), offs=offs)           # [N, r]
    lora = gmm(h, p["task_b"].transpose(1, 2), offs=offs)             # [N, d_out]
    return base_linear(p) + _shared(p) + p["s1"] * lora


def concat_mask(p):
    T, r, d_in = p["task_a"].shape
    r0 = p["shared_a"].shape[0]
    a_all = torch.cat([p["shared_a"], p["task_a"].reshape(T * r, d_in)], 0)                 # [r0 + T r, d_in]
    b_all = torch.cat([p["s0"] * p["shared_b"], p["s1"] * p["task_b"].permute(1, 0, 2).reshape(-1, T * r)], 1)
    dev = p["x"].device
    col_task = torch.cat([torch.full((r0,), -1, device=dev), torch.arange(T, device=dev).repeat_interleave(r)])
    mask = (col_task[None, :] == -1) | (col_task[None, :] == p["task_ids"][:, None])          # [N, r0 + T r]
    h = F.linear(p["x"], a_all) * mask.to(p["x"].dtype)
    return base_linear(p) + F.linear(h, b_all)


def triton_kernel(fuse):
    def run(p):
        from ckf_dist.kernels.multi_lora_triton import multi_lora_linear_triton

        return multi_lora_linear_triton(p["x"], p["weight"], None, p["shared_a"], p["shared_b"], p["task_a"],
                                        p["task_b"], p["seg"], p["s0"], p["s1"], fuse_shrink=fuse)
    return run


METHODS = [
    ("base linear", base_linear),
    ("per-task index loop", index_loop),
    ("grouped_mm", grouped_mm),
    ("concat + mask", concat_mask),
    ("triton (auto)", triton_kernel(None)),
    ("triton fused shrink", triton_kernel(True)),
    ("triton separate shrink", triton_kernel(False)),
]


def time_fwd_bwd(fn, p, warmup, rep):
    import triton.testing

    grads = [p[k] for k in ("x", "shared_a", "shared_b", "task_a", "task_b")]

    def step():
        fn(p).backward(p["dy"])

    return triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=grads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--tokens", type=int, default=None, help="override the token count of every shape")
    ap.add_argument("--warmup", type=int, default=25, help="ms of warm-up per method (do_bench)")
    ap.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per method (do_bench)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_multi_lora: no CUDA device found; this benchmark times GPU kernels and needs a GPU.")
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"# multi-task LoRA linear, forward+backward, {args.dtype}, frozen base weight, shared rank = task rank")
    print(f"# GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    if _grouped_mm_fn() is None:
        print("# grouped_mm: skipped (neither torch.nn.functional.grouped_mm nor torch._grouped_mm exists)")
    for name, tokens, d_in, d_out, r, T in SHAPES:
        tokens = args.tokens or tokens
        p = make_problem(tokens, d_in, d_out, r, T, dtype)
        print(f"\n## {name}: tokens {tokens}, d_in {d_in}, d_out {d_out}, r0 = r = {r}, T {T}")
        print(f"{'method':<26}{'ms':>10}{'x base':>9}{'rel diff':>11}")
        with torch.no_grad():
            y_ref = triton_kernel(None)(p).float()
        base_ms = None
        for label, fn in METHODS:
            if fn is grouped_mm and _grouped_mm_fn() is None:
                print(f"{label:<26}{'skipped: no grouped_mm in this torch':>30}")
                continue
            try:
                with torch.no_grad():
                    y = fn(p).float()
                diff = "-" if fn is base_linear else f"{((y - y_ref).abs().max() / y_ref.abs().max()).item():.1e}"
                ms = time_fwd_bwd(fn, p, args.warmup, args.rep)
            except Exception as exc:  # keep the table going (e.g. grouped_mm unsupported on this GPU/dtype)
                print(f"{label:<26}  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
                continue
            base_ms = ms if fn is base_linear else base_ms
            ratio = f"{ms / base_ms:.2f}x" if base_ms else "-"
            print(f"{label:<26}{ms:>10.3f}{ratio:>9}{diff:>11}")
        del p
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
