"""Times a CF refresh (read -> train -> publish) and the pickup pause a trainer sees (load + dense layout).

    python benchmarks/bench_cf_refresh.py [--engine ray|arrow] [--sizes ml100k,1m] [--models mf,lightgcn]
                                         [--epochs 10] [--out results.json]

Data sets: MovieLens-100K (../shared/data/ml-100k/u.data, per-user time split) or, when absent, a planted
set of the same size; a synthetic planted set of ~1M interactions (20k users x 5k items x 50 per user).
Everything runs on the local CPU; numbers depend on the load of the machine (shared 2-core boxes vary 2-5x).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from ckf_dist import cf_refresh
from ckf_dist.cf.store import load_version
from ckf_dist.cf.testdata import write_movielens_100k, write_planted
from ckf_dist.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
ML100K = os.environ.get("CKF_SHARED_DATA", os.path.join(HERE, "..", "..", "shared", "data"))


def make_data(size: str, root: str) -> str:
    path = os.path.join(root, size)
    if size == "ml100k":
        raw = os.path.join(ML100K, "ml-100k")
        if os.path.exists(os.path.join(raw, "u.data")):
            write_movielens_100k(path, raw)
        else:
            write_planted(path, num_users=943, num_items=1682, per_user=106)
    elif size == "1m":
        write_planted(path, num_users=20000, num_items=5000, per_user=50, num_clusters=20, rows_per_file=250_000)
    else:
        raise SystemExit(f"unknown size {size!r}")
    return path


def pickup_pause(root: str, repeats: int = 5) -> dict:
    loads, dense = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ev = load_version(root)
        t1 = time.perf_counter()
        ev.dense_tables()
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        dense.append(t2 - t1)
    return {"load_s": statistics.median(loads), "dense_s": statistics.median(dense)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="ray", choices=["ray", "arrow"])
    ap.add_argument("--sizes", default="ml100k,1m")
    ap.add_argument("--models", default="mf,lightgcn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            t0 = time.perf_counter()
            data = make_data(size, tmp)
            print(f"# data {size} written in {time.perf_counter() - t0:.1f}s", flush=True)
            for model in args.models.split(","):
                batch = 4096 if size == "ml100k" else 16384
                out = os.path.join(tmp, f"emb-{size}-{model}")
                cfg = load_config([f"data.path={data}", f"cf.embeddings_path={out}", f"cf.model={model}",
                                   f"cf.reader={args.engine}", f"cf.epochs={args.epochs}", f"cf.dim={args.dim}",
                                   f"cf.batch_size={batch}"])
                lines = []
                t0 = time.perf_counter()
                cf_refresh.refresh_once(cfg, progress=lambda m: (lines.append(m), print("  " + m, flush=True)))
                total = time.perf_counter() - t0
                m = load_version(out).manifest
                row = {"size": size, "model": model, "engine": args.engine, "dim": args.dim,
                       "interactions": m["data_snapshot"]["num_rows"], "users": m["num_user_rows"],
                       "items": m["num_item_rows"], "epochs_run": m["metrics"]["epochs_run"],
                       "refresh_s": total, "read_s": m["metrics"]["read_seconds"],
                       "train_s": m["metrics"]["train_seconds"],
                       "s_per_epoch": m["metrics"]["train_seconds"] / m["metrics"]["epochs_run"],
                       "valid_auc": m["metrics"]["auc"], "valid_recall@20": m["metrics"]["recall@20"],
                       **pickup_pause(out)}
                results.append(row)
                print(json.dumps(row), flush=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "load_avg": os.getloadavg()}
    print("\n| data | model | interactions | epochs | refresh s | read s | train s | s/epoch | valid AUC | "
          "R@20 | pickup load ms | dense ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']} | {r['model']} | {r['interactions']:,} | {r['epochs_run']} | {r['refresh_s']:.1f} | "
              f"{r['read_s']:.1f} | {r['train_s']:.1f} | {r['s_per_epoch']:.2f} | {r['valid_auc']:.3f} | "
              f"{r['valid_recall@20']:.3f} | {1000 * r['load_s']:.1f} | {1000 * r['dense_s']:.1f} |")
    print(json.dumps(env))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
