"""A CKF training step vs HF transformers + peft (single LoRA on the same targets), same tokens, same device, one run.

    python benchmarks/bench_vs_peft.py                    # GPU: LLaMA-1B shape, bf16, 8 x 1024 tokens
    python benchmarks/bench_vs_peft.py --tiny             # CPU smoke test (tiny LLaMA, fp32: not the target figure)

Issue 15's fifth target (measured on one H100 by the GPU issue): the CKF step at >= 45% MFU and >= 1.6x the
tokens/s of HF + peft (anchor on H100 at 8 x 1024 tokens, SDPA: HF + peft 54k tokens/s = 26.4% MFU).

Both sides train the same frozen random-init LLaMA shape (``ckf_dist.kernels.bench_train_step``'s ``BenchShape``;
default the LLaMA-3.2-1B shape: hidden 2048, 16 layers, 32 / 8 kv heads, MLP 8192, vocab 128256) on the same
synthetic batch (``make_synthetic_batch``: B full-length rows, answer tokens labelled) with SDPA attention, AdamW
and gradient clipping, timed by the same ``time_steps``:

- CKF: ``CKFModel`` with LoRAConfig's placement (shared adapter on k, v, o; per-task adapters on q) and the
  batched Multi-LoRA (``triton`` on CUDA, the ``torch`` segments on CPU), the soft tokens of the hybrid rows,
  the loss on the answer tokens with the output head run only there;
- HF + peft: ``LlamaForCausalLM`` + ``peft.get_peft_model`` with one LoRA of the same rank and alpha on q, k, v, o
  (the union of CKF's targets: per token both sides run exactly one adapter per target), ``model(input_ids,
  attention_mask, labels).loss`` (logits over every position, as HF computes them).

MFU = each side's model FLOPs per step (``ckf_dist.flops``: the same formula for both; HF's output head runs on
every position, CKF's on the answer positions) / step time / peak (the bf16 table by GPU name, else a matmul
probe in the benchmark's dtype).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import statistics
import sys
from typing import Optional

import torch

from ckf_dist.flops import matmul_probe_tflops, model_shape, step_counts, step_flops, table_peak_tflops
from ckf_dist.kernels.bench_train_step import (TINY_CPU, TINYLLAMA_1B, BenchShape, build_bench_model,
                                               make_synthetic_batch, time_steps, use_variant)

# LLaMA-3.2-1B's shape (the anchor's "LLaMA-1B"): a 1.24 B-parameter base; 8 rows x 1024 tokens per step.
LLAMA_1B = dataclasses.replace(TINYLLAMA_1B, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                               vocab_size=128256, rows=8, seq_len=1024)
SHAPES = {"llama-1b": LLAMA_1B, "tinyllama-1b": dataclasses.replace(TINYLLAMA_1B, rows=8)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # LoRAConfig's shared (k, v, o) + per-task (q) targets


def parse_args(argv) -> tuple[argparse.Namespace]:
    """(options,) without running anything (tests/test_readme_commands.py parses the README's command)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA on CPU in fp32 (automatic without CUDA)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b", help="the 1B shape (GPU)")
    p.add_argument("--rows", type=int, default=None, help="batch rows (default: the shape's, 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the shape's, 1024)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 3; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 10; tiny 3)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for the MFU (0 = table, else probe)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    args = p.parse_args(argv)
    args.overrides = []
    return (args,)


def ckf_side(shape: BenchShape, batch: dict, dtype, device: str, args) -> dict:
    """Times the CKF step; returns its figures and model FLOPs."""
    from ckf_dist.config import LoRAConfig

    model, _ = build_bench_model(shape, "default", dtype, device, LoRAConfig().dropout, lora_b_std=0.01)
    impl = "triton" if device == "cuda" else "torch"
    use_variant(model, impl)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-3)
    task_weights = torch.ones(model.num_tasks, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(batch, text_weight=0.5, task_weights=task_weights)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        optimizer.step()

    ms = _timed(step, args, device)
    shape_f = model_shape(model)
    counts = step_counts(batch, placeholder_id=shape.vocab_size)
    out = {"label": f"CKF (Multi-LoRA {impl})", "ms": ms, "flops": step_flops(shape_f, counts)["total"],
           "trainable_params": sum(p.numel() for p in trainable), "config": copy.deepcopy(model.llm.config),
           "shape": shape_f, **_mem(device)}
    del model, optimizer
    return out


def peft_side(config, shape: BenchShape, shape_f, batch: dict, dtype, device: str, args) -> dict:
    """Times HF transformers + peft on the same LLaMA shape, tokens and labels."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from ckf_dist.config import LoRAConfig

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        llm = LlamaForCausalLM(config)
    llm.to(dtype).config.use_cache = False
    d = LoRAConfig()  # build_bench_model's rank and alpha (scaled with the rank as there) and dropout
    model = get_peft_model(llm, LoraConfig(r=shape.rank, lora_alpha=d.alpha * shape.rank / d.rank, lora_dropout=d.dropout,
                                           target_modules=TARGETS, bias="none")).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        optimizer.step()

    ms = _timed(step, args, device)
    counts = step_counts(batch, placeholder_id=-1)  # no soft tokens on this side
    counts.update(answer_positions=batch["input_ids"].numel(), hybrid_samples=0, item_soft_tokens=0)
    out = {"label": "HF transformers + peft (single LoRA)", "ms": ms,
           "flops": step_flops(shape_f, counts)["total"], "trainable_params": sum(p.numel() for p in trainable),
           **_mem(device)}
    del model, optimizer
    return out


def _timed(step, args, device: str) -> list[float]:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return time_steps(step, args.warmup, args.steps, device)


def _mem(device: str) -> dict:
    if device != "cuda":
        return {}
    out = {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    torch.cuda.empty_cache()
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    """Runs both sides; prints their tokens/s, MFU and the ratio; returns (and optionally writes) the results."""
    import transformers

    (args,) = parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    shape = TINY_CPU if tiny else SHAPES[args.shape]
    shape = dataclasses.replace(shape, **{k: v for k, v in (("rows", args.rows), ("seq_len", args.seq_len))
                                          if v is not None})
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.steps = args.steps if args.steps is not None else (3 if tiny else 10)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = args.peak_tflops or (table_peak_tflops(name) if dtype == torch.bfloat16 else None)
    source = "--peak-tflops" if args.peak_tflops else "table (bf16 dense)" if peak else "matmul probe"
    if peak is None:
        peak = matmul_probe_tflops(torch.device(device), dtype)
    import peft

    print(f"# CKF training step vs HF transformers + peft | {name} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | peft {peft.__version__} | {datetime.date.today()}")
    if tiny:
        print("# NOTE: tiny LLaMA on CPU in fp32 -- a smoke test of the script, NOT the target measurement")
    tokens = shape.rows * shape.seq_len
    print(f"# shape: hidden {shape.hidden_size}, {shape.num_layers} layers, heads {shape.num_heads}/{shape.num_kv_heads}"
          f", MLP {shape.intermediate_size}, vocab {shape.vocab_size}+1, LoRA rank {shape.rank}; batch {shape.rows} x "
          f"{shape.seq_len} = {tokens:,} tokens; {args.warmup} warm-up + {args.steps} timed steps per side; peak "
          f"{peak:.3f} TFLOP/s ({source})")

    batch = make_synthetic_batch(shape, device)
    ckf = ckf_side(shape, batch, dtype, device, args)
    config, shape_f = ckf.pop("config"), ckf.pop("shape")
    hf = peft_side(config, shape, shape_f, batch, dtype, device, args)
    results = {}
    for key, side in (("ckf", ckf), ("hf_peft", hf)):
        ms = statistics.median(side["ms"])
        side.update(ms_median=ms, tokens_per_s=tokens / (ms / 1e3),
                    mfu=side["flops"] / (ms / 1e3) / (peak * 1e12))
        results[key] = side
    ratio = results["ckf"]["tokens_per_s"] / results["hf_peft"]["tokens_per_s"]
    print(f"\n{'side':<40}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/step':>12}{'MFU':>8}{'trainable':>12}")
    for side in results.values():
        print(f"{side['label']:<40}{side['ms_median']:>10.2f}{side['tokens_per_s']:>12,.0f}"
              f"{side['flops'] / 1e12:>12.4f}{100 * side['mfu']:>7.2f}%{side['trainable_params']:>12,}")
    print(f"# CKF / HF + peft tokens/s: {ratio:.2f}x")
    if not tiny:
        ok = results["ckf"]["mfu"] >= 0.45 and ratio >= 1.6
        print(f"# issue 15 target: CKF >= 45% MFU and >= 1.6x HF + peft: {100 * results['ckf']['mfu']:.1f}% MFU, "
              f"{ratio:.2f}x -> {'met' if ok else 'NOT met'}")
    out = {"device": name, "dtype": str(dtype), "date": str(datetime.date.today()), "tiny": tiny,
           "shape": dataclasses.asdict(shape), "tokens_per_step": tokens, "peak_tflops": peak, "peak_source": source,
           "warmup": args.warmup, "steps": args.steps, "sides": results, "ratio_tokens_per_s": ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"# results written to {args.json}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
