"""Padded vs packed training steps on the same batches: tokens per step (real and computed) and step time.

    python benchmarks/bench_packing.py                       # the embedded CPU default (prepares its data once)
    python benchmarks/bench_packing.py --steps 40 training.batch_size=32 training.pack_tokens=384

Runs in-process on one device (no Ray, no DeepSpeed): the CKF model of the config (a random base of the same
shape: step time does not depend on the weights), batches of ``training.batch_size`` samples from the train split,
tokenised as training tokenises them. Each batch runs forward + backward padded, then packed
(``ckf_dist.data.packing``), alternating, so that machine noise hits both alike; the losses of the two layouts are
compared on every batch. Prints medians; ``--out`` writes the JSON.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source tree

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ckf_dist.config import Config, load_config, pack_tokens, resolve_data_path  # noqa: E402


def parse_args(argv) -> tuple[argparse.Namespace, Config]:
    """(options with ``overrides``, config); a bad option or key exits / raises naming it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Trailing key=value pairs are config overrides (ckf_dist.config).")
    p.add_argument("--config", default=None, help="a config YAML")
    p.add_argument("--steps", type=int, default=30, help="measured batches (each run padded and packed)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="", help="write the results as JSON here")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = overrides
    cfg = load_config((["--config", args.config] if args.config else []) + overrides)
    return args, cfg


def _batches(cfg: Config, tokenizer, n: int):
    """n + change batches of tokenised train rows (numpy columns, as the collate function gets them)."""
    import pyarrow.dataset as pads

    from ckf_dist.data import io
    from ckf_dist.data.schema import TASK_IDS
    from ckf_dist.data.streaming import tokenize_batch

    fs, path = io.get_filesystem(resolve_data_path(cfg), cfg.data.s3)
    table = pads.dataset(io.join(path, "prompts", "train"), filesystem=fs, format="parquet").to_table()
    wanted = [TASK_IDS[t] for t in cfg.data.tasks]
    table = table.filter(pads.field("task_id").isin(wanted))
    rng = np.random.default_rng(cfg.training.seed)
    bs = cfg.training.batch_size
    rows = rng.permutation(table.num_rows)[: n * bs]
    tok = tokenize_batch(table.take(rows), tokenizer, cfg.data.max_seq_len)
    cols = {c: tok.column(c).to_numpy(zero_copy_only=False) for c in tok.column_names}
    return [{c: v[i * bs:(i + 1) * bs] for c, v in cols.items()} for i in range(len(rows) // bs)]


def main(argv=None) -> int:
    args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    from ckf_dist.data.collate import collate_prompts
    from ckf_dist.data.packing import pack_batch, token_counts
    from ckf_dist.data.prepare import is_prepared, prepare
    from ckf_dist.data.schema import TASK_IDS
    from ckf_dist.train import build_tokenizer
    from ckf_dist.worker import build_ckf_model

    if not is_prepared(resolve_data_path(cfg), cfg.data.s3):
        prepare(cfg)
    tokenizer = build_tokenizer(cfg)
    budget = pack_tokens(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, packing=True)))
    model_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=""))  # random base, same shape
    model = build_ckf_model(model_cfg, tokenizer, torch.randn(cfg.data.num_users + 1, cfg.cf.dim),
                            torch.randn(cfg.data.num_items + 1, cfg.cf.dim)).train()
    pad = tokenizer.pad_token_id
    res = {"padded": {"ms": [], "real": [], "computed": [], "rows": []},
           "packed": {"ms": [], "real": [], "computed": [], "rows": [], "pack_ms": []}}
    max_loss_diff = 0.0
    for i, cols in enumerate(_batches(cfg, tokenizer, args.warmup + args.steps)):
        padded = collate_prompts(cols, pad, len(TASK_IDS))
        t0 = time.perf_counter()
        packed = pack_batch(padded, budget, pad, len(TASK_IDS))
        pack_ms = 1e3 * (time.perf_counter() - t0)
        losses = {}
        for name, batch in (("padded", padded), ("packed", packed)) if i % 2 == 0 else \
                (("packed", packed), ("padded", padded)):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = model(batch, text_weight=0.5)["loss"]
            loss.backward()
            ms = 1e3 * (time.perf_counter() - t0)
            losses[name] = float(loss.detach())
            if i >= args.warmup:
                real, computed = token_counts(batch)
                r = res[name]
                r["ms"].append(ms), r["real"].append(real), r["computed"].append(computed)
                r["rows"].append(int(batch["input_ids"].shape[0]))
        if i >= args.warmup:
            res["packed"]["pack_ms"].append(pack_ms)
        max_loss_diff = max(max_loss_diff, abs(losses["padded"] - losses["packed"]))
    out = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} "
                      f"({torch.get_num_threads()} threads)",
           "date": time.strftime("%Y-%m-%d", time.gmtime()), "batch_size": cfg.training.batch_size,
           "pack_tokens": budget, "max_seq_len": cfg.data.max_seq_len, "steps": len(res["padded"]["ms"]),
           "attn_implementation": model.llm.config._attn_implementation, "max_abs_loss_diff": max_loss_diff}
    for name, r in res.items():
        out[name] = {k: statistics.median(v) for k, v in r.items() if v}
    print(json.dumps(out, indent=2))
    pad_r, pack_r = out["padded"], out["packed"]
    print(f"median per step: padded {pad_r['ms']:.1f} ms on {pad_r['computed']:.0f} tokens ({pad_r['real']:.0f} real), "
          f"packed {pack_r['ms']:.1f} ms on {pack_r['computed']:.0f} tokens (+ {pack_r['pack_ms']:.2f} ms packing "
          f"in the collate); speed-up {pad_r['ms'] / pack_r['ms']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
