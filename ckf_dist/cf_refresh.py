"""CF embedding refresh job: read interactions -> train MF/LightGCN (warm start) -> publish a version.

    python -m ckf_dist.cf_refresh [--config FILE] [--every 6h] [--max-runs N] [key=value ...]
    ray job submit --working-dir . -- python -m ckf_dist.cf_refresh --config configs/x.yaml

One-shot by default (for cron / RayCronJob). ``--every 6h`` loops: a run starts every interval (s, m, h,
d suffixes; the next start is measured from the previous start, and a run longer than the interval is
followed at once by the next). In loop mode a failed run is reported and retried at the next tick; in
one-shot mode a failure exits non-zero. Exit codes: 0 ok, 1 refresh failed, 2 bad arguments/config.

Mutual learning (``cf.mutual=true``, ``ckf_dist.mutual``; arXiv 2311.03778): a training run with
``cf.mutual=true`` exports the LLM side's item representations with its adapter (``item_repr.npy``); the refresh
reads the newest one of ``checkpoint.storage_path/checkpoint.run_name`` (or ``cf.mutual_source``: an adapter or
run folder, local or s3://), fits a ridge map from them to the current CF item vectors at the start of every
epoch, and adds ``cf.mutual_weight`` x the squared distance of the batch's item and user vectors to their mapped
targets to the CF loss. No representations, or ones for another data set: the run fails naming the path (a
scheduled job retries at its next tick; nothing is published without the pull it was asked for). The published
version's ``metrics["mutual"]`` holds the source and the CF-only valid metrics (AUC, Recall@20, NDCG@20) of
the warm-start version before and of the new version after; both are printed. The first version a training run
bootstraps (``ensure_embeddings``) is trained without the pull: no adapter exists yet.
"""
from __future__ import annotations

import copy
import re
import sys
import time
import traceback
from typing import Callable, Optional

from ckf_dist.cf import store
from ckf_dist.cf.binding import binding_problem, check_version_for_data, warm_start_problem
from ckf_dist.cf.reader import read_interactions
from ckf_dist.cf.trainer import train_cf
from ckf_dist.config import Config, ConfigError, load_config, resolve_data_path, resolve_embeddings_path

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """'90s' / '15m' / '6h' / '1d' / '1h30m' / plain seconds -> seconds (> 0)."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"cannot read interval {text!r}: use e.g. 30m, 6h, 1d, 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"interval {text!r} must be positive")
    return seconds


def refresh_once(cfg: Config, progress: Callable[[str], None] = print) -> str:
    """Trains ``cfg.cf.model`` on ``<data>/interactions`` and publishes a version; returns its id.

    Reads the train split for fitting and the valid split for early stopping/metrics (Ray Data by
    default, ``cf.reader=arrow`` without Ray); warm-starts from the latest version when ``cf.warm_start`` and
    it was trained on this same data set (``binding.warm_start_problem``; rows mapped by raw id), else cold;
    publishes to ``resolve_embeddings_path(cfg)`` keeping ``cf.keep_versions``, bound to this data set
    (its manifest hash and id maps: ``ckf_dist.cf.binding``).
    """
    t0 = time.perf_counter()
    data_root = resolve_data_path(cfg)
    out_root = resolve_embeddings_path(cfg)
    s3 = cfg.data.s3
    progress(f"[cf_refresh] reading {data_root}/interactions (engine={cfg.cf.reader})")
    data = read_interactions(data_root, s3=s3, engine=cfg.cf.reader, ray_address=cfg.ray.address,
                             ray_num_cpus=cfg.ray.local_num_cpus, progress=progress)
    t_read = time.perf_counter() - t0
    progress(f"[cf_refresh] {data.stats['rows_used']} interactions {data.stats['per_split']}, "
             f"{data.num_users} users, {data.num_items} items ({t_read:.1f}s)")
    previous = None
    if cfg.cf.warm_start:
        try:
            previous = store.load_version(out_root, s3=s3)
        except FileNotFoundError:
            progress(f"[cf_refresh] no previous version under {out_root}: cold start")
        except store.CorruptVersionError as exc:
            progress(f"[cf_refresh] WARNING latest version is unusable, cold start instead: {exc}")
    skipped = {}
    if previous is not None:
        why = warm_start_problem(previous, data.binding)
        if why:
            progress(f"[cf_refresh] no warm start from {previous.version}: {why}; cold start")
            skipped, previous = {"from_version": previous.version, "skipped": why}, None
    reps = _mutual_reps(cfg, data, progress) if cfg.cf.mutual else None
    result = train_cf(data, cfg.cf, previous=previous, progress=progress,
                      reps=reps.reps if reps is not None else None)
    snapshot = dict(data.snapshot, num_users=data.num_users, num_items=data.num_items,
                    per_split=data.stats["per_split"], malformed=data.stats["malformed"])
    metrics = dict(result.metrics, read_seconds=t_read)
    config = {k: getattr(cfg.cf, k) for k in ("model", "loss", "dim", "epochs", "lr", "batch_size",
                                              "num_negatives", "reg", "patience", "lightgcn_layers", "seed",
                                              "mutual", "mutual_weight", "mutual_ridge")}
    metrics["config"] = config
    metrics["warm_start"] = result.warm_start or skipped
    if reps is not None:
        metrics["mutual"] = _mutual_record(cfg, data, previous, result, reps, progress)
    version = store.publish_version(
        out_root, result.user_table[result.user_ids], result.item_table[result.item_ids],
        user_ids=result.user_ids, item_ids=result.item_ids, model_type=cfg.cf.model, metrics=metrics,
        data_snapshot=snapshot, keep=cfg.cf.keep_versions, s3=s3, progress=progress,
        user_raw_ids=data.user_raw_ids[result.user_ids], item_raw_ids=data.item_raw_ids[result.item_ids],
        binding=data.binding)
    shown = ", ".join(f"{k}={result.metrics[k]:.4f}" for k in ("auc", "recall@20", "ndcg@20", "rmse")
                      if isinstance(result.metrics.get(k), float))
    progress(f"[cf_refresh] published {version} to {out_root}: {len(result.user_ids)} users, "
             f"{len(result.item_ids)} items, d={cfg.cf.dim}; {shown}; total {time.perf_counter() - t0:.1f}s")
    return version


def _mutual_reps(cfg: Config, data, progress: Callable[[str], None]):
    """The LLM side's item representations for ``cf.mutual`` (``ckf_dist.mutual``): found, read and checked
    against this data set before any training, so a missing or mismatched source fails the run at once (a
    FileNotFoundError / ValueError naming the path) instead of publishing a version without the pull."""
    from ckf_dist.mutual import find_source, load_item_representations

    source = find_source(cfg)
    reps = load_item_representations(source, data.num_items, s3=cfg.data.s3,
                                     data_manifest_sha256=data.binding.get("data_manifest_sha256"))
    progress(f"[cf_refresh] mutual: item representations {list(reps.reps.shape)} from {source} (step "
             f"{reps.meta.get('step')}, CF version {reps.meta.get('cf_version')}), weight {cfg.cf.mutual_weight}")
    return reps


def _mutual_record(cfg: Config, data, previous, result, reps, progress: Callable[[str], None]) -> dict:
    """``metrics["mutual"]``: the source and the CF-only metrics (``evaluate_tables`` on the valid split, the
    same evaluation material for both) of the warm-start version before this refresh and of the new tables."""
    from ckf_dist.cf.trainer import evaluate_tables, version_tables

    keys = ("auc", "recall@20", "ndcg@20")
    kw = dict(max_users=cfg.cf.eval_max_users, seed=cfg.cf.seed)
    before = None
    if previous is not None:
        users, items = version_tables(previous, data)
        before = {k: v for k, v in evaluate_tables(users, items, data, "valid", **kw).items() if k in keys}
        before["version"] = previous.version
    after = {k: v for k, v in evaluate_tables(result.user_table, result.item_table, data, "valid", **kw).items()
             if k in keys}
    last = result.history[-1] if result.history else {}
    record = {"source": reps.source, "weight": cfg.cf.mutual_weight, "ridge": cfg.cf.mutual_ridge,
              "refit": "every epoch", "items": int(reps.reps.shape[0]), "hidden": int(reps.reps.shape[1]),
              "source_step": reps.meta.get("step"), "source_cf_version": reps.meta.get("cf_version"),
              "last_epoch_mutual_loss": last.get("mutual_loss"), "split": "valid",
              "before": before, "after": after}

    def fmt(m):
        return "n/a (cold start)" if not m else ", ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)
    progress(f"[cf_refresh] mutual: CF-only valid metrics before ({previous.version if previous else '-'}): "
             f"{fmt(before)}; after: {fmt(after)}")
    return record


def ensure_embeddings(cfg: Config, data_manifest: dict, progress: Callable[[str], None] = print) -> str:
    """The id of a CF embedding version trained on the data set whose manifest dict is ``data_manifest``
    (``ckf_dist.data.streaming.read_manifest(cfg)``), for a training run to start from.

    Returns the latest version when it is bound to this data set; when the store is empty, or the latest
    version is unbound, corrupt, or was trained on another data set (e.g. the data was re-prepared with
    another split), runs one ``refresh_once`` and says why in a progress line. Raises DataMismatchError when
    even the fresh version does not match (the data set was re-prepared while the refresh read it).
    """
    root = resolve_embeddings_path(cfg)
    s3 = cfg.data.s3
    version = store.latest_version(root, s3=s3)
    if version is None:
        progress(f"no CF embedding version under {root}: running a quick {cfg.cf.model} refresh first")
    else:
        try:
            problem = binding_problem(store.load_version(root, version, s3=s3), data_manifest)
        except (FileNotFoundError, store.CorruptVersionError) as exc:
            problem = f"it cannot be loaded ({exc})"
        if problem is None:
            progress(f"CF embeddings: {version} (trained on this data set)")
            return version
        progress(f"CF embedding version {version} under {root}: {problem}: refreshing")
    if cfg.cf.mutual:  # the LLM side trains on this first version: there are no representations to pull to yet
        progress("this refresh runs without cf.mutual: the training run it starts is what exports the representations")
        cfg = copy.deepcopy(cfg)
        cfg.cf.mutual = False
    version = refresh_once(cfg, progress=progress)
    check_version_for_data(store.load_version(root, version, s3=s3), data_manifest, root=root,
                           data_path=resolve_data_path(cfg))
    progress(f"CF embeddings: {version}")
    return version


SUMMARY = ("Refreshes the CF embeddings: reads the prepared interactions (Ray Data, or pyarrow with cf.reader=arrow), "
           "trains cf.model (MF or LightGCN, warm-started from the latest version of the same data set) and publishes "
           "an immutable embedding version under cf.embeddings_path; the latest pointer moves last. One-shot by "
           "default (for cron / RayCronJob); exit codes: 0 ok, 1 refresh failed, 2 bad arguments or config.")
OPTIONS = (("--every INTERVAL", "loop: start a run every INTERVAL (s, m, h, d suffixes, e.g. 30m, 6h, 1h30m), measured "
                                "from the previous start; a failed run is reported and retried at the next tick"),
           ("--max-runs N", "with --every: stop after N runs (0 = never)"))


def parse_args(argv: list[str]) -> tuple[Config, Optional[float], int]:
    """(config, --every in seconds or None, --max-runs) from the command line, without refreshing anything.
    Raises ConfigError or ValueError naming the bad option, key or value."""
    every, max_runs, rest = None, 0, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--every" or arg == "--max-runs":
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} needs a value")
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--every=") or arg.startswith("--max-runs="):
            arg, value = arg.split("=", 1)
            i += 1
        else:
            rest.append(arg)
            i += 1
            continue
        if arg == "--every":
            every = parse_interval(value)
        else:
            try:
                max_runs = int(value)
            except ValueError:
                raise ValueError(f"--max-runs needs a whole number, got {value!r}") from None
    return load_config(rest), every, max_runs


def main(argv: Optional[list[str]] = None) -> int:
    from ckf_dist.config import cli_help, show_help, wants_help

    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return show_help(cli_help("python -m ckf_dist.cf_refresh", SUMMARY, OPTIONS))
    try:
        cfg, every, max_runs = parse_args(argv)
    except (ConfigError, ValueError) as exc:
        print(f"cf_refresh: {exc}", file=sys.stderr)
        return 2
    if every is None:
        try:
            refresh_once(cfg, progress=lambda m: print(m, flush=True))
        except Exception:  # noqa: BLE001 - report and exit non-zero for cron
            traceback.print_exc()
            return 1
        return 0
    runs = 0
    while True:
        start = time.monotonic()
        runs += 1
        try:
            refresh_once(cfg, progress=lambda m: print(m, flush=True))
        except Exception:  # noqa: BLE001 - a failed run must not end the loop
            print(f"[cf_refresh] run {runs} failed; next attempt in {every:.0f}s", file=sys.stderr, flush=True)
            traceback.print_exc()
        if max_runs and runs >= max_runs:
            return 0
        wait = max(0.0, every - (time.monotonic() - start))
        print(f"[cf_refresh] next run in {wait:.0f}s", flush=True)
        time.sleep(wait)


if __name__ == "__main__":
    sys.exit(main())
