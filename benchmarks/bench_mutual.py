"""CF-only metrics of a refresh with and without ``cf.mutual``, from the same previous version (issue 18 item 3).

    python benchmarks/bench_mutual.py --source ~/ckf_runs/mutual-probe/adapter [--version V] [--seeds 0,1,2]
        [--weights 0.1,1.0] [--models mf,lightgcn] [--out results.json] [key=value ...]

Reads the prepared data set of the config (default: the embedded synthetic one), the previous version ``V``
(default: the latest of the store) and the exported item representations; trains ``cf.model`` per seed without
the pull, with it at each weight, and with a control: random representations of the same shape (a pull with
no LLM content), all warm-started from ``V`` exactly as ``cf_refresh.refresh_once`` does, but nothing is
published. Prints and writes AUC / Recall@20 / NDCG@20 on valid and test (``evaluate_tables``) of ``V`` and of
each run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import numpy as np

from ckf_dist.cf import store
from ckf_dist.cf.reader import read_interactions
from ckf_dist.cf.trainer import evaluate_tables, train_cf, version_tables
from ckf_dist.config import load_config, resolve_data_path, resolve_embeddings_path
from ckf_dist.mutual import load_item_representations

KEYS = ("auc", "recall@20", "ndcg@20")


def _metrics(users, items, data, seed):
    return {split: {k: v for k, v in evaluate_tables(users, items, data, split, seed=seed).items() if k in KEYS}
            for split in ("valid", "test")}


def parse_args(argv) -> tuple[argparse.Namespace]:
    """(options with ``overrides``: the trailing key=value config overrides) without running anything."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, help="adapter folder with item_repr.npy")
    ap.add_argument("--version", default=None, help="the previous version (default: the store's latest)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--weights", default="0.1,1.0", help="comma list of cf.mutual_weight values")
    ap.add_argument("--models", default="mf,lightgcn")
    ap.add_argument("--out", default="")
    args, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        ap.error(f"unrecognised arguments: {' '.join(bad)}")
    args.overrides = rest
    return (args,)


def main(argv=None) -> None:
    import sys

    (args,) = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.overrides + ["cf.reader=arrow"])
    data = read_interactions(resolve_data_path(cfg), engine="arrow")
    prev = store.load_version(resolve_embeddings_path(cfg), args.version)
    reps = load_item_representations(os.path.expanduser(args.source), data.num_items,
                                     data_manifest_sha256=data.binding.get("data_manifest_sha256"))
    control = np.random.default_rng(12345).normal(size=reps.reps.shape).astype(np.float32)
    report = {"machine": f"{platform.node()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d %H:%M UTC",
              time.gmtime()), "data": resolve_data_path(cfg), "previous": prev.version, "source": reps.source,
              "reps_shape": list(reps.reps.shape), "source_meta": reps.meta,
              "before": _metrics(*version_tables(prev, data), data, 0), "runs": []}
    print(f"previous {prev.version}: {report['before']}")
    for model in args.models.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            variants = [("plain", None, 0.0)] + [(f"mutual w={w}", reps.reps, float(w)) for w in args.weights.split(",")]
            variants += [(f"random reps w={w}", control, float(w)) for w in args.weights.split(",")]
            for name, r, w in variants:
                c = copy.deepcopy(cfg.cf)
                c.model, c.seed, c.mutual_weight = model, seed, w
                t0 = time.perf_counter()
                res = train_cf(data, c, previous=prev if prev.manifest.get("model_type") == model else None,
                               progress=lambda m: None, reps=r)
                m = _metrics(res.user_table, res.item_table, data, 0)
                row = {"model": model, "seed": seed, "variant": name, "weight": w, **m,
                       "best_epoch": res.metrics["best_epoch"], "seconds": round(time.perf_counter() - t0, 2),
                       "warm_start": bool(res.warm_start and "skipped" not in res.warm_start)}
                report["runs"].append(row)
                print(f"{model} seed {seed} {name:18s} valid " + " ".join(f"{k} {m['valid'][k]:.4f}" for k in KEYS)
                      + " | test " + " ".join(f"{k} {m['test'][k]:.4f}" for k in KEYS)
                      + f" (best epoch {row['best_epoch']}, warm {row['warm_start']})", flush=True)
    print("\nmeans over seeds (test):")
    for model in args.models.split(","):
        for name in dict.fromkeys(r["variant"] for r in report["runs"]):
            rows = [r for r in report["runs"] if r["model"] == model and r["variant"] == name]
            if rows:
                print(f"{model} {name:18s} " + " ".join(
                    f"{k} {statistics.mean(r['test'][k] for r in rows):.4f}" for k in KEYS)
                    + "  valid " + " ".join(f"{k} {statistics.mean(r['valid'][k] for r in rows):.4f}" for k in KEYS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
