"""Entry point: ``python -m ckf_dist.train [--verbose] [--config FILE] [key=value ...]`` (``--help`` lists every key).

The driver: loads the config, connects to Ray (``ray.address``, ``RAY_ADDRESS``, or a new local Ray), makes sure
the data set and a CF embedding version exist (preparing/refreshing them when missing), builds the tokeniser
and the Ray Data pipelines, and runs a ``TorchTrainer`` whose workers run ``ckf_dist.worker``. Re-running
the same command with the same ``checkpoint.run_name`` resumes from that run's latest checkpoint.
With no arguments it runs the embedded CPU default: synthetic data, a tiny LLaMA, 2 workers, ZeRO-3.
The console shows the driver's lines and rank 0's progress (``ckf_dist.console``); the workers' full logs stay
in Ray's log folder (``--verbose`` forwards them).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from typing import Optional

from ckf_dist import console
from ckf_dist.config import Config, ConfigError, cli_help, load_config, resolve_data_path, show_help, wants_help
from ckf_dist.data import io

log = logging.getLogger("ckf_dist.train")

CPU_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "GLOO_SOCKET_IFNAME": "lo"}


def _say(msg: str) -> None:
    console.say(f"[ckf_dist] {msg}")


# Sub-step lines of the driver's own work (prepare's stages, the quick CF refresh's epochs, the tiny base's
# pretraining steps): on a terminal they pass over the live line; otherwise only --verbose prints them (the
# lines that follow them carry the results).
DETAIL_PREFIXES = ("[prepare] read ", "[prepare] ids + time split", "[prepare] prompts:", "[prepare] write:",
                   "[cf_refresh] reading ", "[cf_refresh] no previous version", "[cf] epoch ",
                   "[cf.store] published ", "[pretrain] step ")


def progress_printer(verbose: bool):
    """The progress callback the driver hands to prepare, the CF refresh and the tiny base's pretraining."""
    def progress(msg: str) -> None:
        if not verbose and msg.startswith(DETAIL_PREFIXES):
            console.detail(f"[ckf_dist] {msg}")
        else:
            _say(msg)
    return progress


def gpu_plan(use_gpu: str, cluster_gpus: float, num_workers: int, gpus_per_worker: float) -> tuple[bool, Optional[str]]:
    """(train on GPUs?, the line to print while waiting for them or None).

    ``ray.use_gpu=true`` never refuses a cluster that has fewer GPUs than the workers need (an autoscaling
    cluster may have none until the GPU workers are requested): Ray's scheduler holds the worker group until
    the GPUs are there (Ray Train retries the start without a limit) and the driver says what it waits for.
    ``auto`` trains on GPUs when the cluster has any (and waits for the rest), else on CPUs; ``false`` on CPUs.
    """
    need = num_workers * gpus_per_worker
    use = use_gpu == "true" or (use_gpu == "auto" and cluster_gpus > 0)
    if use and cluster_gpus < need:
        return True, f"waiting for {need:g} GPUs: the cluster has {cluster_gpus:g} now (autoscaling)"
    return use, None


class GpuWait:
    """Repeats the wait line while the workers have not started: when the GPU count changes, else every
    ``every_s`` seconds (called from the console's pump thread)."""

    def __init__(self, cfg: Config, use_gpu: bool, every_s: float = 60.0, said_for_gpus: Optional[float] = None):
        self.cfg, self.use_gpu, self.every_s = cfg, use_gpu, every_s
        self.last_gpus, self.last_t = said_for_gpus, time.monotonic()  # init_ray said it for this count

    def __call__(self, started: bool) -> None:
        import ray

        if started or not self.use_gpu or time.monotonic() - self.last_t < 5:
            return
        gpus = ray.cluster_resources().get("GPU", 0)
        _, line = gpu_plan("true", gpus, self.cfg.ray.num_workers, self.cfg.ray.gpus_per_worker)
        if line and (gpus != self.last_gpus or time.monotonic() - self.last_t >= self.every_s):
            _say(line)
            self.last_gpus, self.last_t = gpus, time.monotonic()


class _NoBarsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def _quiet_driver(verbose: bool) -> None:
    """Keeps the driver's own console to its lines: Ray Data's progress bars and INFO lines off on the console
    (its full log stays in ``<session>/logs/ray-data.log``), no transformers progress bar when saving the tiny
    base. ``--verbose`` leaves everything as the libraries set it."""
    if verbose:
        return
    from ray.data import DataContext  # importing ray.data also sets up its "ray.data" loggers

    # Datasets copy the current context when they are created, so the training shards' SplitCoordinator (in
    # Ray's logs) draws no bars either.
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").addFilter(_NoBarsNotice())  # "Progress bars disabled. To..."
    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "name", "") == "console":
            handler.setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _log_dir() -> str:
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path()  # no public API for it in Ray 2.60
    except Exception:  # noqa: BLE001
        return "Ray's log folder (<temp dir>/session_latest/logs)"


def init_ray(cfg: Config, verbose: bool = False) -> bool:
    """Connects to or starts Ray; returns whether GPUs will be used. Without ``verbose`` the workers' output is
    not forwarded to the driver (``log_to_driver=False``): it stays in Ray's log folder."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if not ray.is_initialized():
        if address:
            ray.init(address=address, **{"log_to_driver": True, **quiet})
            _say(f"connected to Ray at {address}; worker logs: {_log_dir()} on each node"
                 + ("" if verbose else " (--verbose prints them here)"))
        else:
            import torch

            local_gpu = torch.cuda.is_available()
            env = {} if local_gpu and cfg.ray.use_gpu != "false" else dict(CPU_ENV)
            kwargs = {"num_cpus": cfg.ray.local_num_cpus} if cfg.ray.local_num_cpus else {}
            auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
            level = auth_log.level
            if not verbose:  # said in our own line below
                auth_log.setLevel(logging.ERROR)
            # address="local": a new local Ray, never some other cluster that happens to run on this machine.
            # The dashboard (ray[default]) also serves the State API that Ray Train polls; without it Ray
            # prints "State API may be temporarily unavailable" every few seconds.
            try:
                context = ray.init(address="local", runtime_env={"env_vars": env}, **kwargs, **quiet)
            finally:
                auth_log.setLevel(level)
            auth = "token auth on" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else "no auth"
            _say(f"started a local Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
                 f"{ray.cluster_resources().get('GPU', 0):g} GPUs; {auth}; dashboard "
                 f"http://{context.dashboard_url or '-'}); worker logs: {_log_dir()}")
    use, wait_line = gpu_plan(cfg.ray.use_gpu, ray.cluster_resources().get("GPU", 0), cfg.ray.num_workers,
                              cfg.ray.gpus_per_worker)
    if wait_line:
        _say(wait_line)
    if not use:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the driver imports DeepSpeed too (no accelerator notice)
    return use


def ensure_data(cfg: Config, progress=_say) -> dict:
    """The prepared data set's manifest; prepares it first when missing and ``data.prepare_if_missing``."""
    from ckf_dist.data.prepare import is_prepared, prepare

    root = resolve_data_path(cfg)
    if not is_prepared(root, cfg.data.s3):
        if not cfg.data.prepare_if_missing:
            raise FileNotFoundError(f"no prepared data set at {root} and data.prepare_if_missing=false")
        _say(f"no prepared data at {root}: preparing {cfg.data.source} shards")
        return prepare(cfg, progress=progress)
    from ckf_dist.data.streaming import read_manifest

    return read_manifest(cfg)


def ensure_embeddings(cfg: Config, data_manifest: dict, progress=_say) -> str:
    """The latest CF embedding version trained on this data set; runs one refresh first when the store is
    empty or its latest version was trained on another data set (``ckf_dist.cf_refresh.ensure_embeddings``)."""
    from ckf_dist.cf_refresh import ensure_embeddings as ensure

    return ensure(cfg, data_manifest, progress=progress)


def ensure_base_model(cfg: Config, tokenizer, data_manifest: dict, progress=_say) -> Config:
    """For the tiny model with ``model.tiny.pretrain_steps > 0`` and no ``model.path``: the config with
    ``model.path`` set to the pretrained tiny base of this data set (``ckf_dist.model.pretrain``; built and
    cached on the first run). Other models are returned unchanged."""
    if cfg.model.source != "tiny" or cfg.model.path or cfg.model.tiny.pretrain_steps == 0:
        return cfg
    from ckf_dist.model.pretrain import ensure_tiny_base

    path = ensure_tiny_base(cfg, tokenizer, data_manifest, progress=progress)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))


def build_tokenizer(cfg: Config):
    if cfg.model.source == "tiny":
        from ckf_dist.data.streaming import tokenizer_corpus
        from ckf_dist.model.llm import build_tiny_tokenizer

        return build_tiny_tokenizer(tokenizer_corpus(cfg), cfg.model.tiny.vocab_size)
    from ckf_dist.model.llm import load_pretrained_tokenizer

    return load_pretrained_tokenizer(cfg.model, cfg.data.s3)


def storage(cfg: Config):
    """(pyarrow filesystem or None, storage path as Ray Train expects it)."""
    path = cfg.checkpoint.storage_path
    if io.is_s3(path):
        fs, p = io.get_filesystem(path, cfg.data.s3)
        return fs, p
    return None, os.path.abspath(os.path.expanduser(path))


def run(cfg: Config, verbose: bool = False):
    """Runs (or resumes) training; returns the Ray Train ``Result``. ``verbose``: see ``init_ray``."""
    out = console.Console()
    console.activate(out)
    try:
        return _run(cfg, verbose, out)
    finally:
        out.close()
        console.activate(None)


def _run(cfg: Config, verbose: bool, out: "console.Console"):
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ckf_dist.data.streaming import prompt_dataset
    from ckf_dist.data.validate import check_data_set
    from ckf_dist.heldout import heldout_table
    from ckf_dist.metrics_log import JSONL, TB_DIR, run_folder
    from ckf_dist.worker import FAULT_KILL_ENV, FAULT_PAUSE_ENV, train_loop_per_worker

    t0 = time.time()
    progress = progress_printer(verbose)
    use_gpu = init_ray(cfg, verbose)
    _quiet_driver(verbose)
    manifest = ensure_data(cfg, progress)
    # Before anything is written or a worker starts: a bad shard found by a worker would be retried
    # ray.max_failures times on the same file (ckf_dist.data.validate).
    shards = check_data_set(resolve_data_path(cfg), manifest, cfg.data.s3)
    _say(f"data: {resolve_data_path(cfg)} ({manifest.get('num_users')} users, {manifest.get('num_items')} items; "
         f"{shards} shards checked)")
    ensure_embeddings(cfg, manifest, progress)
    tokenizer = build_tokenizer(cfg)
    cfg = ensure_base_model(cfg, tokenizer, manifest, progress)
    datasets = {"train": prompt_dataset(cfg, "train", tokenizer)}
    heldout = heldout_table(cfg, tokenizer) if cfg.training.eval_rows else None
    if heldout is not None:
        _say(f"held-out rows for the before/after evaluation: {heldout.num_rows} from "
             f"{'+'.join(cfg.training.eval_splits)} (<= {cfg.training.eval_rows} per task)")
    fs, storage_path = storage(cfg)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    # rank 0's progress reaches this console through a sink actor (ckf_dist.console); --verbose: Ray's forwarding
    sink = None if verbose else ray.remote(num_cpus=0)(console.ConsoleSink).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(cfg), "tokenizer": tokenizer, "use_gpu": use_gpu,
                           "data_manifest": manifest, "heldout": heldout, "console": sink,
                           # tells an in-place restart (same launch) from a resume by rerun (worker.py)
                           "launch_id": uuid.uuid4().hex,
                           # fault injection for tests only: rank 1 kills itself once after this step
                           "fault_kill_at_step": int(os.environ.get(FAULT_KILL_ENV, "0") or 0),
                           # and rank 0 pauses once after this step's checkpoint ("<step>:<local folder>")
                           "fault_pause": os.environ.get(FAULT_PAUSE_ENV, "")},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.checkpoint.run_name, storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                             # a failed worker group restarts and resumes from the latest checkpoint
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=data_config(cfg, DataConfig),
    )
    _say(f"training run '{cfg.checkpoint.run_name}' -> {cfg.checkpoint.storage_path} "
         f"({cfg.ray.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage}, {'GPU' if use_gpu else 'CPU'}; "
         f"worker failures survived: {'no limit' if cfg.ray.max_failures < 0 else cfg.ray.max_failures})")
    _say(f"metrics every {cfg.training.log_every} steps: {run_folder(cfg)}/{JSONL}; "
         f"tensorboard --logdir {run_folder(cfg)}/{TB_DIR}")
    wait = GpuWait(cfg, use_gpu, said_for_gpus=ray.cluster_resources().get("GPU", 0))
    pump = console.SinkPump(sink, out, on_tick=wait).start() if sink is not None else None
    try:
        result = trainer.fit()
    finally:
        if pump is not None:
            pump.stop()
            ray.kill(sink)
    if result.error:
        raise result.error
    if cfg.checkpoint.export_adapter and result.checkpoint is not None:
        dest = publish_adapter(cfg, result.checkpoint)
        _say(f"adapter exported to {dest}")
    report = write_run_metrics(cfg, result, time.time() - t0)
    print_summary(report)
    return result


def data_config(cfg: Config, data_config_cls):
    """Ray Train's ``DataConfig`` for the training set: None (Ray's default) unless ``training.deterministic_data``,
    then a copy of the current Ray Data execution options with ``preserve_order`` (the split into worker shards
    is then the same on every run). A copy, not ``DataConfig.default_ingest_options()``: that one passes
    ``exclude_resources`` to ``ExecutionOptions`` and Ray 2.60 prints a deprecation warning for it."""
    import copy

    from ray.data import DataContext

    if not cfg.training.deterministic_data:
        return None
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return data_config_cls(execution_options=options)


def publish_adapter(cfg: Config, checkpoint) -> str:
    """Copies the final checkpoint's adapter/ to <storage_path>/<run_name>/adapter (a stable location)."""
    import pyarrow.fs as pafs

    from ckf_dist.worker import ADAPTER_DIR

    dest_uri = io.join(cfg.checkpoint.storage_path, cfg.checkpoint.run_name, ADAPTER_DIR)
    dest_fs, dest = io.get_filesystem(dest_uri, cfg.data.s3)
    src = io.join(checkpoint.path, ADAPTER_DIR)
    dest_fs.delete_dir_contents(dest, missing_dir_ok=True)
    pafs.copy_files(src, dest, source_filesystem=checkpoint.filesystem, destination_filesystem=dest_fs)
    return dest_uri


def write_run_metrics(cfg: Config, result, seconds: float) -> dict:
    """Writes ``<storage_path>/<run_name>/metrics.json`` (the held-out report before/after training in every
    prompt form, the permuted-CF control, CF-only and the fusion effect, plus the run's facts) and returns it."""
    import json

    from ckf_dist.worker import HELDOUT_FILE

    metrics = result.metrics or {}
    heldout = {}
    if result.checkpoint is not None:
        src = io.join(result.checkpoint.path, HELDOUT_FILE)
        if io.exists(result.checkpoint.filesystem, src):
            heldout = io.read_json(result.checkpoint.filesystem, src)
    report = {"schema": "ckf-run-metrics/1", "run_name": cfg.checkpoint.run_name, "step": metrics.get("step"),
              "stopped_by": metrics.get("stopped_by"), "cf_version": metrics.get("cf_version"),
              "train_seconds": metrics.get("train_seconds"), "wall_seconds": round(seconds, 1),
              "restarts": metrics.get("restarts", 0),
              "model": {"source": cfg.model.source, "path": cfg.model.path},
              "gradient_routing": cfg.training.gradient_routing, "curriculum": cfg.training.curriculum,
              "eval_splits": list(cfg.training.eval_splits), **heldout}
    dest_fs, dest = io.get_filesystem(io.join(cfg.checkpoint.storage_path, cfg.checkpoint.run_name, "metrics.json"),
                                      cfg.data.s3)
    io.write_bytes(dest_fs, dest, json.dumps(report, indent=2).encode("utf-8"))
    _say(f"metrics written to {io.join(cfg.checkpoint.storage_path, cfg.checkpoint.run_name, 'metrics.json')}")
    return report


def _cell(value) -> str:
    return f"{value:8.4f}" if isinstance(value, (int, float)) else " " * 8


def print_summary(report: dict) -> None:
    """The held-out table: rows = metrics, columns = prompt forms before and after training, and CF-only."""
    from ckf_dist.heldout import FORMS

    before, after = report.get("before") or {}, report.get("after") or {}
    if after.get("forms"):
        rows = after.get("rows", {})
        _say("held-out rows (" + "+".join(report.get("eval_splits", [])) + "): "
             + ", ".join(f"{n} {t}" for t, n in rows.items()))
        short = {"hybrid": "hybrid", "text": "text", "hybrid_cf_permuted": "perm.CF"}
        head = "".join(f"{'before ' + short[f]:>16s}" for f in FORMS) + "".join(
            f"{'after ' + short[f]:>16s}" for f in FORMS) + f"{'CF-only':>10s}"
        _say(f"  {'metric':18s}{head}")
        keys = sorted({k for m in after["forms"].values() for k in m})
        for k in keys:
            cells = [_cell((before.get("forms", {}).get(f) or {}).get(k)) for f in FORMS]
            cells += [_cell(after["forms"][f].get(k)) for f in FORMS]
            _say(f"  {k:18s}" + "".join(f"{c:>16s}" for c in cells) + f"{_cell(after.get('cf_only', {}).get(k)):>10s}")
        fusion = after.get("fusion")
        if fusion:
            ci = fusion["cf_effect_ci95"]
            interval = (f"paired bootstrap 95% CI {ci[0]:+.4f}..{ci[1]:+.4f}, {fusion['bootstrap_resamples']} "
                        "resamples" if ci else "no bootstrap interval: too few rows of one class")
            _say(f"CF knowledge, CTR AUC on {fusion['ctr_rows']} rows: hybrid - text {fusion['hybrid_minus_text_auc']:+.4f}; "
                 f"hybrid - permuted CF tables {fusion['cf_effect_auc']:+.4f} ({interval})")
    _say(f"done: step {report.get('step')}, CF embeddings {report.get('cf_version')}, "
         f"wall time {report.get('wall_seconds', 0):.0f}s")


SUMMARY = ("Trains CKF with Multi-LoRA on Ray Train + DeepSpeed ZeRO-3: connects to Ray (ray.address, RAY_ADDRESS) "
           "or starts a local one, prepares the data set and a CF embedding version when missing, scores the held-out "
           "rows before and after training, checkpoints to checkpoint.storage_path/checkpoint.run_name (the same "
           "command resumes), exports the adapter and prints the held-out table. No arguments: the embedded CPU "
           "default run (synthetic data, tiny LLaMA, 2 workers).")
OPTIONS = (("--verbose", "print every line the workers, Ray Train, Ray Data and DeepSpeed write (by default they stay "
                         "in Ray's log folder, and the console shows the driver's lines and rank 0's progress)"),)


def parse_args(argv: list[str]) -> tuple[Config, bool]:
    """(config, verbose) from the command line, without running anything (tests/test_readme_commands.py parses
    the README's commands with it). Raises ConfigError naming the bad key, file or value."""
    args = list(argv)
    verbose = "--verbose" in args
    return load_config([a for a in args if a != "--verbose"]), verbose


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        return show_help(cli_help("python -m ckf_dist.train", SUMMARY, OPTIONS))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, verbose = parse_args(args)
    except ConfigError as exc:
        print(f"ckf_dist.train: config error: {exc}", file=sys.stderr)
        return 2
    run(cfg, verbose=verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
