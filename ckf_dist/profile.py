"""Entry point: ``python -m ckf_dist.profile [--verbose] [--config FILE] [key=value ...]``: throughput of the real
pipeline (also as ``ray job submit -- python -m ckf_dist.profile ...``).

Runs ``ckf_dist.train.run`` (Ray Data streaming, Ray Train workers, the DeepSpeed engine, the configured model,
kernels and switches) with ``profile.enabled``: ``profile.warmup_steps`` untimed steps, ``profile.steps``
measured steps and ``profile.trace_steps`` traced ones, timed inside ``ckf_dist.worker.train_loop_per_worker``
by ``ckf_dist.step_profile`` (the training loop itself, not a copy). It then writes to ``profile.out``:

- ``profile.json``: per worker and in total, real tokens/s (padding excluded), padded tokens/s, samples/s,
  model FLOPs per step (``ckf_dist.flops``), achieved TFLOP/s, MFU against the device's peak (the bf16 table
  for A100/H100/H200, ``profile.peak_tflops``, or a matmul probe measured on the worker: every CPU), the mean
  step broken into data wait, CF pickup, forward, backward, optimizer, checkpoint (one save timed, amortised
  over ``checkpoint.every_steps``) and other, and the peak memory;
- ``profile.png``: the breakdown per worker and the headline figures (matplotlib, Agg);
- ``trace.json``: rank 0's ``torch.profiler`` Chrome trace of the traced steps (open it in https://ui.perfetto.dev).

A profile is a short run of its own: the run name gets a ``-profile-<time>`` suffix (it never resumes, nor
touches, the training run of that name), the held-out evaluation and the adapter export are off, the tiny
base is not pretrained (weights do not change a step's cost), and a worker failure ends it (``ray.max_failures=0``). No arguments: the embedded default on CPU.
"""
from __future__ import annotations

import dataclasses
import datetime
import io as _io
import json
import logging
import sys

from ckf_dist import console
from ckf_dist.config import Config, ConfigError, cli_help, load_config, show_help, wants_help
from ckf_dist.data import io
from ckf_dist.flops import ModelShape, step_flops
from ckf_dist.step_profile import PROFILE_DIR, SECTIONS, TIMINGS_FILE, TRACE_FILE

BREAKDOWN = SECTIONS + ("other",)
MFU_FORMULA = ("MFU = model FLOPs per step / step time / peak FLOP/s; model FLOPs per step = 4 * N_base * tokens "
               "(frozen decoder linears: forward + input gradient) + 4 * V * h * answer positions (output head) "
               "+ 6 * sum_layers r * (d_in + d_out) * adapters * tokens (Multi-LoRA: forward + both gradients) "
               "+ 6 * h_q * layers * sum_samples l * (l + 1) (causal attention) + 6 * mapping parameters per use; "
               "real tokens only (ckf_dist/flops.py)")


def _say(msg: str) -> None:
    console.say(f"[ckf_dist.profile] {msg}")


def profile_config(cfg: Config, stamp: str = "") -> Config:
    """The run ``cfg`` describes, turned into a profile run (see the module docstring)."""
    p = cfg.profile
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rep = dataclasses.replace
    return rep(cfg,
               profile=rep(p, enabled=True),
               training=rep(cfg.training, max_steps=p.warmup_steps + p.steps + p.trace_steps, max_minutes=0.0,
                            eval_rows=0),
               checkpoint=rep(cfg.checkpoint, run_name=f"{cfg.checkpoint.run_name}-profile-{stamp}",
                              export_adapter=False),
               model=rep(cfg.model, tiny=rep(cfg.model.tiny, pretrain_steps=0)),
               # a worker restarted mid-profile would resume inside the measured window: fail instead
               ray=rep(cfg.ray, max_failures=0))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def worker_report(w: dict) -> dict:
    """One worker's figures from its measured steps (``ckf_dist.step_profile.StepTimer`` records)."""
    steps = w["steps"]
    saves = [s["checkpoint"] for s in steps if s["checkpoint"] > 0]
    save_s = _mean(saves)
    every = max(int(w["checkpoint_every_steps"]), 1)
    breakdown = {k: _mean(s[k] for s in steps) for k in SECTIONS if k != "checkpoint"}
    breakdown["checkpoint"] = save_s / every  # one save's time spread over the configured cadence
    step_s = _mean(s["step_s"] - s["checkpoint"] for s in steps) + breakdown["checkpoint"]
    breakdown["other"] = max(step_s - sum(breakdown.values()), 0.0)
    count_keys = ("tokens", "padded_tokens", "samples", "attn_pairs", "answer_positions", "hybrid_samples",
                  "item_soft_tokens")
    per_step = {k: _mean(s[k] for s in steps) for k in count_keys}
    flops = step_flops(ModelShape(**w["shape"]), per_step)
    achieved = flops["total"] / step_s / 1e12
    return {"rank": w["rank"], "device": w["device"], "peak_tflops": w["peak_tflops"], "peak_source": w["peak_source"],
            "measured_steps": len(steps), "step_s": step_s, "breakdown_s": breakdown,
            "breakdown_fraction": {k: v / step_s for k, v in breakdown.items()},
            "checkpoint_save_s": save_s, "checkpoint_every_steps": every,
            "tokens_per_step": per_step["tokens"], "padded_tokens_per_step": per_step["padded_tokens"],
            "samples_per_step": per_step["samples"], "tokens_per_s": per_step["tokens"] / step_s,
            "padded_tokens_per_s": per_step["padded_tokens"] / step_s, "samples_per_s": per_step["samples"] / step_s,
            "padding_fraction": 1.0 - per_step["tokens"] / max(per_step["padded_tokens"], 1),
            "model_flops_per_step": flops, "achieved_tflops": achieved, "mfu": achieved / w["peak_tflops"],
            "peak_memory_bytes": w["peak_memory_bytes"], "peak_memory_kind": w["peak_memory_kind"]}


def build_report(timings: dict, cfg: Config) -> dict:
    """profile.json's content from the gathered worker timings."""
    import deepspeed
    import ray
    import torch
    import transformers

    raw = sorted(timings["workers"], key=lambda w: w["rank"])
    if all(w["peak_source"].startswith("measured") for w in raw):
        # Workers probe at the same time as the others load their models: a busy moment only lowers a probe.
        # Same machine type everywhere, so the best probe is every worker's peak (a low one would inflate MFU).
        best = max(raw, key=lambda w: w["peak_tflops"])
        raw = [{**w, "peak_tflops": best["peak_tflops"],
                "peak_source": f"{best['peak_source']}, best of {len(raw)} workers"} for w in raw]
    workers = [worker_report(w) for w in raw]
    first = timings["workers"][0]
    total = {k: sum(w[k] for w in workers) for k in ("tokens_per_s", "padded_tokens_per_s", "samples_per_s",
                                                        "achieved_tflops", "peak_tflops")}
    total["mfu"] = total["achieved_tflops"] / total["peak_tflops"]
    total["step_s"] = max(w["step_s"] for w in workers)  # data parallel: the slowest rank sets the pace
    total["breakdown_s"] = {k: _mean(w["breakdown_s"][k] for w in workers) for k in BREAKDOWN}
    total["peak_memory_bytes_max"] = max(w["peak_memory_bytes"] for w in workers)
    return {"schema": "ckf-profile/1", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "ray": ray.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__},
            "run_name": cfg.checkpoint.run_name, "world_size": first["world_size"], "switches": first["switches"],
            "warmup_steps": cfg.profile.warmup_steps, "measured_steps": cfg.profile.steps,
            "trace_steps": cfg.profile.trace_steps, "model_shape": first["shape"], "mfu_formula": MFU_FORMULA,
            "workers": workers, "total": total}


def write_chart(report: dict) -> bytes:
    """PNG bytes: the mean step of each worker by section (ms, stacked), the headline figures in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = report["workers"]
    fig, ax = plt.subplots(figsize=(10, 2.2 + 0.4 * len(workers)))
    left = [0.0] * len(workers)
    labels = [f"rank {w['rank']}" for w in workers]
    for k in BREAKDOWN:
        ms = [1e3 * w["breakdown_s"][k] for w in workers]
        ax.barh(labels, ms, left=left, label=k)
        left = [a + b for a, b in zip(left, ms)]
    t, sw = report["total"], report["switches"]
    ax.set_xlabel("ms per step (mean of the measured steps; checkpoint amortised)")
    ax.set_title(f"{t['tokens_per_s']:,.0f} real tokens/s ({t['padded_tokens_per_s']:,.0f} padded), "
                 f"{t['samples_per_s']:,.1f} samples/s, MFU {100 * t['mfu']:.2f}%\n"
                 f"{workers[0]['device']}, ZeRO-{sw['zero_stage']}, {sw['precision']}, micro-batch {sw['batch_size']}"
                 f", checkpointing {'on' if sw['gradient_checkpointing'] else 'off'}", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run_profile(cfg: Config, verbose: bool = False) -> dict:
    """Runs the profile run and writes profile.json, profile.png and trace.json to ``profile.out``; returns
    the report (with "files": where each went)."""
    from ckf_dist import train
    from ckf_dist.metrics_log import run_folder

    cfg = profile_config(cfg)
    train.run(cfg, verbose=verbose)
    src_fs, src = io.get_filesystem(io.join(run_folder(cfg), PROFILE_DIR), cfg.data.s3)
    report = build_report(json.loads(io.read_bytes(src_fs, io.join(src, TIMINGS_FILE))), cfg)
    out_fs, out = io.get_filesystem(cfg.profile.out, cfg.data.s3)
    files = {"json": io.join(cfg.profile.out, "profile.json"), "png": io.join(cfg.profile.out, "profile.png")}
    io.write_bytes(out_fs, io.join(out, "profile.png"), write_chart(report))
    if io.exists(src_fs, io.join(src, TRACE_FILE)):
        io.write_bytes(out_fs, io.join(out, TRACE_FILE), io.read_bytes(src_fs, io.join(src, TRACE_FILE)))
        files["trace"] = io.join(cfg.profile.out, TRACE_FILE)
    report["files"] = files
    io.write_bytes(out_fs, io.join(out, "profile.json"), json.dumps(report, indent=2).encode("utf-8"))
    print_report(report)
    return report


def print_report(report: dict) -> None:
    sw = report["switches"]
    _say(f"{report['world_size']} workers, ZeRO-{sw['zero_stage']}, {sw['precision']}, micro-batch "
         f"{sw['batch_size']}, {'packed' if sw['packing'] else 'padded'}, gradient checkpointing "
         f"{'on' if sw['gradient_checkpointing'] else 'off'}; {report['measured_steps']} measured steps after "
         f"{report['warmup_steps']} warm-up")
    _say(f"{'rank':>4} {'step ms':>9} {'tok/s':>10} {'padded/s':>10} {'samples/s':>10} {'TFLOP/s':>8} "
         f"{'peak':>8} {'MFU':>7} {'mem MiB':>8}  " + " ".join(f"{k:>9}" for k in BREAKDOWN))
    for w in report["workers"]:
        _say(f"{w['rank']:>4} {1e3 * w['step_s']:>9.1f} {w['tokens_per_s']:>10,.0f} {w['padded_tokens_per_s']:>10,.0f} "
             f"{w['samples_per_s']:>10,.1f} {w['achieved_tflops']:>8.4f} {w['peak_tflops']:>8.3f} "
             f"{100 * w['mfu']:>6.2f}% {w['peak_memory_bytes'] / 2 ** 20:>8.0f}  "
             + " ".join(f"{1e3 * w['breakdown_s'][k]:>9.1f}" for k in BREAKDOWN))
    t = report["total"]
    _say(f"total: {t['tokens_per_s']:,.0f} real tokens/s, {t['padded_tokens_per_s']:,.0f} padded tokens/s, "
         f"{t['samples_per_s']:,.1f} samples/s, MFU {100 * t['mfu']:.2f}% (peak {report['workers'][0]['peak_source']})")
    _say("wrote " + ", ".join(report["files"].values()))


SUMMARY = ("Profiles the throughput of the real training pipeline (Ray Data streaming, Ray Train workers, DeepSpeed, "
           "the configured model and switches): profile.warmup_steps warm-up, profile.steps measured and "
           "profile.trace_steps traced steps; writes profile.json (tokens/s with and without padding, samples/s, MFU, "
           "the step breakdown, peak memory), profile.png and a torch.profiler trace.json to profile.out. "
           "No arguments: the embedded CPU default.")
OPTIONS = (("--verbose", "print every line the workers, Ray and DeepSpeed write (as python -m ckf_dist.train)"),)


def parse_args(argv: list[str]) -> tuple[Config, bool]:
    """(config, verbose) from the command line, without running anything (tests/test_readme_commands.py)."""
    args = list(argv)
    return load_config([a for a in args if a != "--verbose"]), "--verbose" in args


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        return show_help(cli_help("python -m ckf_dist.profile", SUMMARY, OPTIONS))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, verbose = parse_args(args)
    except ConfigError as exc:
        print(f"ckf_dist.profile: config error: {exc}", file=sys.stderr)
        return 2
    run_profile(cfg, verbose=verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
