"""Entry point: ``python -m ckf_dist.train [--config FILE] [key=value ...]``.

The driver: loads the config, connects to Ray (``ray.address``, ``RAY_ADDRESS``, or a new local Ray), makes sure
the data set and a CF embedding version exist (preparing/refreshing them when missing), builds the tokeniser
and the Ray Data pipelines, and runs a ``TorchTrainer`` whose workers run ``ckf_dist.worker``. Re-running
the same command with the same ``checkpoint.run_name`` resumes from that run's latest checkpoint.
With no arguments it runs the embedded CPU default: synthetic data, a tiny LLaMA, 2 workers, ZeRO-3.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

from ckf_dist.config import Config, ConfigError, load_config, resolve_data_path
from ckf_dist.data import io

log = logging.getLogger("ckf_dist.train")

CPU_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "GLOO_SOCKET_IFNAME": "lo"}


def _say(msg: str) -> None:
    print(f"[ckf_dist] {msg}", flush=True)


def init_ray(cfg: Config) -> bool:
    """Connects to or starts Ray; returns whether GPUs will be used."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    want_gpu = cfg.ray.use_gpu
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
            _say(f"connected to Ray at {address}")
        else:
            import torch

            local_gpu = torch.cuda.is_available()
            env = {} if local_gpu and want_gpu != "false" else dict(CPU_ENV)
            kwargs = {"num_cpus": cfg.ray.local_num_cpus} if cfg.ray.local_num_cpus else {}
            # address="local": a new local Ray, never some other cluster that happens to run on this machine.
            # The dashboard (ray[default]) also serves the State API that Ray Train polls; without it Ray
            # prints "State API may be temporarily unavailable" every few seconds.
            ray.init(address="local", runtime_env={"env_vars": env}, **kwargs)
            _say(f"started a local Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
                 f"{ray.cluster_resources().get('GPU', 0):g} GPUs)")
    gpus = ray.cluster_resources().get("GPU", 0)
    if want_gpu == "true" and gpus < cfg.ray.num_workers * cfg.ray.gpus_per_worker:
        raise ConfigError(f"ray.use_gpu=true but the cluster has {gpus:g} GPUs for {cfg.ray.num_workers} workers")
    return want_gpu == "true" or (want_gpu == "auto" and gpus > 0)


def ensure_data(cfg: Config) -> dict:
    """The prepared data set's manifest; prepares it first when missing and ``data.prepare_if_missing``."""
    from ckf_dist.data.prepare import is_prepared, prepare

    root = resolve_data_path(cfg)
    if not is_prepared(root, cfg.data.s3):
        if not cfg.data.prepare_if_missing:
            raise FileNotFoundError(f"no prepared data set at {root} and data.prepare_if_missing=false")
        _say(f"no prepared data at {root}: preparing {cfg.data.source} shards")
        return prepare(cfg)
    from ckf_dist.data.streaming import read_manifest

    return read_manifest(cfg)


def ensure_embeddings(cfg: Config, data_manifest: dict) -> str:
    """The latest CF embedding version trained on this data set; runs one refresh first when the store is
    empty or its latest version was trained on another data set (``ckf_dist.cf_refresh.ensure_embeddings``)."""
    from ckf_dist.cf_refresh import ensure_embeddings as ensure

    return ensure(cfg, data_manifest, progress=_say)


def ensure_base_model(cfg: Config, tokenizer, data_manifest: dict) -> Config:
    """For the tiny model with ``model.tiny.pretrain_steps > 0`` and no ``model.path``: the config with
    ``model.path`` set to the pretrained tiny base of this data set (``ckf_dist.model.pretrain``; built and
    cached on the first run). Other models are returned unchanged."""
    if cfg.model.source != "tiny" or cfg.model.path or cfg.model.tiny.pretrain_steps == 0:
        return cfg
    from ckf_dist.model.pretrain import ensure_tiny_base

    path = ensure_tiny_base(cfg, tokenizer, data_manifest, progress=_say)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))


def build_tokenizer(cfg: Config):
    if cfg.model.source == "tiny":
        from ckf_dist.data.streaming import tokenizer_corpus
        from ckf_dist.model.llm import build_tiny_tokenizer

        return build_tiny_tokenizer(tokenizer_corpus(cfg), cfg.model.tiny.vocab_size)
    from ckf_dist.model.llm import load_pretrained_tokenizer

    return load_pretrained_tokenizer(cfg.model)


def storage(cfg: Config):
    """(pyarrow filesystem or None, storage path as Ray Train expects it)."""
    path = cfg.checkpoint.storage_path
    if io.is_s3(path):
        fs, p = io.get_filesystem(path, cfg.data.s3)
        return fs, p
    return None, os.path.abspath(os.path.expanduser(path))


def run(cfg: Config):
    """Runs (or resumes) training; returns the Ray Train ``Result``."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ckf_dist.data.streaming import prompt_dataset
    from ckf_dist.heldout import heldout_table
    from ckf_dist.worker import train_loop_per_worker

    t0 = time.time()
    use_gpu = init_ray(cfg)
    manifest = ensure_data(cfg)
    _say(f"data: {resolve_data_path(cfg)} ({manifest.get('num_users')} users, {manifest.get('num_items')} items)")
    ensure_embeddings(cfg, manifest)
    tokenizer = build_tokenizer(cfg)
    cfg = ensure_base_model(cfg, tokenizer, manifest)
    datasets = {"train": prompt_dataset(cfg, "train", tokenizer)}
    heldout = heldout_table(cfg, tokenizer) if cfg.training.eval_rows else None
    if heldout is not None:
        _say(f"held-out rows for the before/after evaluation: {heldout.num_rows} from "
             f"{'+'.join(cfg.training.eval_splits)} (<= {cfg.training.eval_rows} per task)")
    fs, storage_path = storage(cfg)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(cfg), "tokenizer": tokenizer, "use_gpu": use_gpu,
                           "data_manifest": manifest, "heldout": heldout},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.checkpoint.run_name, storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
    )
    _say(f"training run '{cfg.checkpoint.run_name}' -> {cfg.checkpoint.storage_path} "
         f"({cfg.ray.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage}, {'GPU' if use_gpu else 'CPU'})")
    result = trainer.fit()
    if result.error:
        raise result.error
    if cfg.checkpoint.export_adapter and result.checkpoint is not None:
        dest = publish_adapter(cfg, result.checkpoint)
        _say(f"adapter exported to {dest}")
    report = write_run_metrics(cfg, result, time.time() - t0)
    print_summary(report)
    return result


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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"ckf_dist.train: config error: {exc}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
