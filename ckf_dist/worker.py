"""The Ray Train worker: builds CKF + a DeepSpeed engine, streams its data shard, trains, checkpoints, exports.

Every rank runs this function. Collective calls (DeepSpeed steps and checkpoints, ``ray.train.report``,
the evaluation passes) happen the same number of times on every rank: ``ray.train.report`` is a barrier.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from typing import Callable, Optional

import torch

from ckf_dist.config import Config, from_dict, pack_tokens, resolve_embeddings_path
from ckf_dist.console import WorkerProgress, eta_seconds, format_duration
from ckf_dist.data.collate import prompt_collate_fn, to_device
from ckf_dist.data.packing import token_counts
from ckf_dist.data.schema import PLACEHOLDER, TASK_IDS
from ckf_dist import scoring
from ckf_dist.metrics_log import MetricsLog, run_folder
from ckf_dist import flops
from ckf_dist.data.io import join as io_join
from ckf_dist.step_profile import PROFILE_DIR, StepTimer, device_info

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"
ADAPTER_DIR = "adapter"
HELDOUT_FILE = "heldout.json"  # final checkpoint: the held-out report before/after training (rank 0)


def build_deepspeed_config(cfg: Config, world_size: int, use_gpu: bool) -> dict:
    """DeepSpeed JSON config from the typed config (ZeRO stage, precision, clipping), plus ``deepspeed.extra``."""
    precision = cfg.deepspeed.precision
    if precision == "auto":
        precision = "bf16" if use_gpu else "fp32"
    ds = {
        "train_micro_batch_size_per_gpu": cfg.training.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.training.batch_size * world_size,
        "gradient_clipping": cfg.training.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage,
                              "stage3_param_persistence_threshold": cfg.deepspeed.param_persistence_threshold},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW (no JIT-compiled op on CPU)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, cfg.deepspeed.extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def model_dtype(cfg: Config, use_gpu: bool) -> torch.dtype:
    precision = cfg.deepspeed.precision
    if precision == "auto":
        precision = "bf16" if use_gpu else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def zero_init_config(cfg: Config, ds_config: dict) -> Optional[dict]:
    """The DeepSpeed config to create the base model under (sharded loading, ``model.zero_init``), or None:
    auto = on for an ``hf`` model under ZeRO-3 (the tiny and GGUF models are small, or dequantized whole)."""
    if cfg.model.zero_init == "false":
        return None
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    if cfg.model.zero_init == "true":
        if not zero3:
            raise ValueError(f"model.zero_init=true needs ZeRO-3; the DeepSpeed config has stage "
                             f"{ds_config.get('zero_optimization', {}).get('stage')}")
        return ds_config
    return ds_config if zero3 and cfg.model.source == "hf" else None


def build_ckf_model(cfg: Config, tokenizer, user_table: torch.Tensor, item_table: torch.Tensor,
                    dtype: torch.dtype = torch.float32, zero3_config: Optional[dict] = None):
    """The single-device CKF model: frozen LLM (+ <cf> token) with Multi-LoRA, mapping side, CF tables. With
    ``zero3_config`` the LLM's weights are created partitioned (``build_llm``); the adapters and the mapping side
    are created whole (small) and partitioned by ``deepspeed.initialize``."""
    from ckf_dist.model.ckf import CKFModel
    from ckf_dist.model.llm import build_llm

    llm = build_llm(cfg.model, tokenizer, dtype=dtype, s3_config=cfg.data.s3, zero3_config=zero3_config)
    if cfg.model.gradient_checkpointing:
        # Reentrant variant: the non-reentrant one fails under ZeRO-3 with frozen base weights.
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(cfg.model.seed + 1)  # same adapter/mapping init on every rank
    return CKFModel(llm, user_table, item_table, tokenizer.convert_tokens_to_ids(PLACEHOLDER), len(TASK_IDS),
                    cfg.cf, cfg.lora, fusion=cfg.model.fusion,
                    # the item head runs on every forward pass when on (ZeRO-3 keeps ranks in step): only with the task
                    next_item_task=TASK_IDS["next_item"] if "next_item" in cfg.data.tasks else None)


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up then linear decay to 0 (as a multiplier of the base lr); ``step`` may be fractional."""
    def fn(step: float) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return fn


class TrainingClock:
    """How far training has got, in steps, when it may end on a step count *or* a time budget.

    With ``training.max_minutes`` = 0 the effective step is the step. With a budget B seconds it is
    ``max(step, max_steps * seconds / B)``: the lr schedule and the text -> hybrid curriculum then run their
    whole course within the budget, whichever limit comes first, and training ends when it reaches
    ``max_steps``. ``seconds`` counts the training steps only (not set-up, evaluation or checkpoint writes),
    summed over resumed attempts (it is saved in the trainer state). Ranks must agree on when to stop:
    ``sync`` takes the slowest rank's seconds (one scalar all-reduce per step, only with a budget).
    """

    def __init__(self, max_steps: int, max_minutes: float, seconds_before: float = 0.0):
        self.max_steps = max_steps
        self.budget_s = 60.0 * max_minutes
        self.seconds = float(seconds_before)

    def effective_step(self, step: float) -> float:
        if self.budget_s <= 0:
            return float(step)
        return max(float(step), self.max_steps * self.seconds / self.budget_s)

    def done(self, step: int) -> bool:
        return self.effective_step(step) >= self.max_steps

    def stopped_by(self, step: int) -> str:
        return "max_steps" if step >= self.max_steps else "max_minutes"

    def sync(self, device) -> None:
        import torch.distributed as dist

        if self.budget_s > 0 and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([self.seconds], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self.seconds = float(t.item())


def load_cf_tables(cfg: Config, version: str | None, data_manifest: dict):
    """(version id, user table [U+1, d], item table [I+1, d]) from the embedding store; the version must have
    been trained on this data set (``DataMismatchError`` naming both otherwise)."""
    from ckf_dist.cf.binding import load_version_for_data
    from ckf_dist.config import resolve_data_path

    ev = load_version_for_data(resolve_embeddings_path(cfg), version, data_manifest, s3=cfg.data.s3,
                               data_path=resolve_data_path(cfg))
    users, items = ev.dense_tables()
    return ev.version, torch.from_numpy(users), torch.from_numpy(items)


def _task_weights(cfg: Config) -> torch.Tensor:
    w = torch.ones(len(TASK_IDS))
    for name, value in cfg.training.task_weights.items():
        w[TASK_IDS[name]] = float(value)
    return w


def evaluate_heldout(engine, rows: dict, cfg: Config, tokenizer, device, rank: int) -> dict:
    """Scores this rank's held-out rows in every form (``ckf_dist.heldout``), gathers all ranks' scores and
    returns the report on rank 0 ({} elsewhere). A collective: every rank calls it."""
    import torch.distributed as dist

    from ckf_dist import heldout

    engine.eval()
    try:
        part = heldout.score_heldout(lambda batch, hybrid: engine(batch, text_weight=0.0 if hybrid else 1.0),
                                     engine.module, rows, tokenizer, tokenizer.pad_token_id, device,
                                     chunk_size=cfg.training.batch_size)
    finally:
        engine.train()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, part)
    return heldout.summarize_heldout(gathered) if rank == 0 else {}


def rank_rows(table, rank: int, world: int) -> dict:
    """This rank's share (rows rank, rank + world, ...) of the held-out table, as column lists."""
    import pyarrow as pa

    return table.take(pa.array(range(rank, table.num_rows, world), pa.int64())).to_pydict()


def _batches(shard, cfg: Config, pad_id: int, start_epoch: int, skip: int, rank: int):
    """Endless (epoch, index in epoch, batch) over the shard; reshuffled locally each epoch. Batches are padded,
    or packed with ``training.packing`` (same samples per step either way, so data positions do not change)."""
    collate = prompt_collate_fn(pad_id, len(TASK_IDS), pack_tokens=pack_tokens(cfg))
    epoch = start_epoch
    while True:
        n = 0
        for i, batch in enumerate(shard.iter_torch_batches(
                batch_size=cfg.training.batch_size, collate_fn=collate, drop_last=True,
                local_shuffle_buffer_size=cfg.training.shuffle_buffer or None,
                local_shuffle_seed=cfg.training.seed + 1000 * epoch + rank)):
            n += 1
            if epoch == start_epoch and i < skip:
                continue  # consumed before the checkpoint we resumed from
            yield epoch, i, batch
        if n == 0:
            raise RuntimeError("the training shard yielded no full batch: fewer rows than "
                               f"training.batch_size={cfg.training.batch_size} per worker")
        epoch += 1


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray.train.torch  # get_context, get_dataset_shard, report, torch.get_device

    from ckf_dist.cf_pickup import CFVersionFollower, table_checksum
    from ckf_dist.checkpoint import export_adapter
    from ckf_dist.resume import open_resume_checkpoint

    _quiet_worker_warnings()
    cfg: Config = from_dict(loop_config["config"])
    tokenizer = loop_config["tokenizer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available() and loop_config["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    # rank 0's lines: its stdout (Ray's log folder) and, through the driver's sink, the driver's console
    progress = WorkerProgress(loop_config.get("console")) if rank == 0 else None
    log = progress.line if progress is not None else (lambda msg: None)

    # ---- resume state
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "cf_version": None, "train_seconds": 0.0}
    # Ray Train's latest checkpoint, or the newest complete one before it when that one is not (ckf_dist.resume)
    resume_dir_ctx, resume_dir, skipped = open_resume_checkpoint(ray.train.get_checkpoint(), rank, device, log)
    # An in-place restart (Ray Train restarted the worker group after a failure, ray.max_failures) and a
    # resume by rerun take the same path: ray.train.get_checkpoint() is the latest reported checkpoint. The
    # driver's launch id tells them apart (the checkpoint was written by this same trainer.fit()).
    launch = loop_config.get("launch_id")
    restart = False
    if resume_dir:
        with open(os.path.join(resume_dir, STATE_FILE)) as f:
            state.update(json.load(f))
        restart = launch is not None and state.get("launch_id") == launch
        state["skipped_checkpoints"] = skipped
        if restart:
            state["restarts"] = state.get("restarts", 0) + 1
        log(f"{'restarted after a worker failure: ' if restart else ''}resuming from checkpoint at step "
            f"{state['step']} (CF embeddings {state['cf_version']})")
    state["launch_id"] = launch
    mlog = MetricsLog(run_folder(cfg), cfg.data.s3, resume_step=state["step"]) if rank == 0 else None
    if mlog is not None and resume_dir:
        mlog.log("resume", state["step"], {}, {"restart": restart, "restarts": state.get("restarts", 0),
                                               "skipped_checkpoints": skipped})

    data_manifest = loop_config["data_manifest"]
    cf_version, users, items = load_cf_tables(cfg, state["cf_version"], data_manifest)
    ds_config = build_deepspeed_config(cfg, world, use_gpu)
    model = build_ckf_model(cfg, tokenizer, users, items, dtype=model_dtype(cfg, use_gpu),
                            zero3_config=zero_init_config(cfg, ds_config))
    base = base_model_record(cfg, model)
    if resume_dir:
        check_base_model(state.get("base_model"), base, log)
    state["base_model"] = base
    timer = StepTimer.from_config(cfg, device, rank)  # python -m ckf_dist.profile; a no-op in a training run
    profile_extra = _profile_facts(cfg, model, device, use_gpu, world) if timer.enabled else {}
    groups = parameter_groups(model, cfg)
    n_total = sum(numel(p) for p in model.parameters())
    log(f"model: {n_total:,} parameters, " + ", ".join(f"{g['name']} {sum(numel(p) for p in g['params']):,}"
                                                        for g in groups)
        + f" trainable ({len(model.lora_layers)} Multi-LoRA layers); CF embeddings {cf_version}; gradient routing "
        f"{cfg.training.gradient_routing}, curriculum {cfg.training.curriculum}")
    total = cfg.training.max_steps
    clock = TrainingClock(total, cfg.training.max_minutes, state["train_seconds"])
    optimizer = torch.optim.AdamW(groups, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    lr_at = lr_lambda(int(math.ceil(cfg.training.warmup_ratio * total)), total)
    gates = curriculum_gates(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [(lambda s, gate=gate: lr_at(clock.effective_step(s)) * gate(clock.effective_step(s)))
                    for gate in gates])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if resume_dir:
        engine.load_checkpoint(resume_dir, tag=DS_TAG, load_module_strict=False)
        rng_restored = restore_rng(resume_dir, rank)
        resume_dir_ctx.__exit__(None, None, None)
        if not rng_restored:
            log("the checkpoint holds no RNG state for this rank: dropout masks differ from an uninterrupted run")
        # audit of what the checkpoint restored (tests compare these with the interrupted run's last step)
        state["resumed"] = {"optimizer_step": optimizer_step(engine), "lr": scheduler.get_last_lr(),
                            "epoch": state["epoch"], "batch_in_epoch": state["batch_in_epoch"]}
        log(f"restored optimizer step {state['resumed']['optimizer_step']}, lr {state['resumed']['lr']}, data "
            f"position epoch {state['epoch']} batch {state['batch_in_epoch']}")

    pad_id = tokenizer.pad_token_id
    heldout_rows = rank_rows(loop_config["heldout"], rank, world) if loop_config.get("heldout") is not None else None
    metrics: dict = {"resumed_from_step": state["step"]}
    if heldout_rows is not None and state["step"] == 0:
        state["heldout_before"] = evaluate_heldout(engine, heldout_rows, cfg, tokenizer, device, rank)
        log("untrained model on held-out rows: " + _fmt(state["heldout_before"]))
        if mlog is not None:
            mlog.log("heldout", 0, _tagged("heldout", flatten_heldout({"before": state["heldout_before"]})))

    follower = CFVersionFollower(cfg, cf_version, log, data_manifest=data_manifest)
    task_w = _task_weights(cfg).to(device)
    route = cfg.training.gradient_routing == "spec"
    step = state["step"]
    tokens, computed, seconds_start, step_start = 0, 0, clock.seconds, step
    running: dict[str, list[float]] = {}
    interval = {"steps": 0, "seconds": 0.0, "wait": 0.0, "tokens": 0}  # since the last logged step (rank 0)
    group_names = [g["name"] for g in groups]
    kill_at = int(loop_config.get("fault_kill_at_step") or 0)
    batches = _batches(ray.train.get_dataset_shard("train"), cfg, pad_id, state["epoch"], state["batch_in_epoch"], rank)
    layout = f"packed, rows <= {pack_tokens(cfg)} tokens" if cfg.training.packing else "padded"
    if clock.budget_s > 0:
        log(f"time budget {cfg.training.max_minutes:g} min of training steps ({clock.seconds:.0f}s used before)")
    while not clock.done(step):
        timer.start_step(step)
        t_step = time.perf_counter()
        with timer.section("data_wait"):
            epoch, index, batch = next(batches)
        wait = time.perf_counter() - t_step
        timer.count(lambda: flops.step_counts(batch, engine.module.placeholder_id))
        t_pickup = time.perf_counter()
        with timer.section("cf_pickup"):
            new = follower.maybe_swap(step, engine.module)
        if new:
            cf_version = new
            # audit: which step, how long the step waited for the swap (the pickup pause: pointer read, load,
            # agreement, swap), and checksums of the tables the model really holds now (every rank)
            state.setdefault("cf_swaps", []).append({
                "step": step, "version": new, "pause_s": round(time.perf_counter() - t_pickup, 4),
                "user_table_sha256": table_checksum(engine.module.user_table),
                "item_table_sha256": table_checksum(engine.module.item_table)})
        with timer.section("data_wait"):  # the host -> device copy is part of feeding the step
            batch = to_device(batch, device)
        lam = _curriculum(cfg, clock.effective_step(step))
        # spec routing: the two forms' losses reach disjoint parameters and lambda gates the learning rates
        # (curriculum_gates), so the loss is their plain mean; joint: lambda weights the losses.
        with timer.section("forward"):
            out = engine(batch, text_weight=0.5 if route else lam, task_weights=task_w, route_gradients=route)
        with timer.section("backward"):
            engine.backward(out["loss"])
        with timer.section("optimizer"):
            engine.step()
        step += 1
        real, padded = token_counts(batch)  # real tokens; tokens computed on (incl. padding)
        tokens += real
        computed += padded
        _accumulate(running, out["row_loss"], batch)
        dt = time.perf_counter() - t_step
        clock.seconds += dt
        clock.sync(device)
        _add(interval, steps=1, seconds=dt, wait=wait, tokens=real)
        finished = clock.done(step)
        log_now = step % cfg.training.log_every == 0 or finished
        if progress is not None and (log_now or progress.due(step, total)):
            rate = tokens * world / max(clock.seconds - seconds_start, 1e-9)
            eta = eta_seconds(step, total, clock.seconds, step_start, seconds_start, clock.budget_s)
            loss = out["loss"].item()
            text = None
            if log_now:
                lrs = "/".join(f"{lr:.2e}" for lr in scheduler.get_last_lr())
                text = (f"step {step}/{total} ({clock.seconds:.0f}s) loss {loss:.4f} lambda {lam:.3f} "
                        f"lr {lrs} tokens/step/rank {tokens / max(step - step_start, 1):,.0f} real "
                        f"{computed / max(step - step_start, 1):,.0f} with padding ({layout}) "
                        f"{rate:,.0f} tok/s ETA {format_duration(eta)} | "
                        + " ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(running.items())))
            progress.step(step, total, loss, rate, eta, text)
        if log_now and mlog is not None:
            mlog.log("train", step, step_scalars(out["loss"].detach(), running, lam, scheduler.get_last_lr(), group_names,
                                                 engine.get_global_grad_norm(), interval, world,
                                                 len(state.get("cf_swaps", []))),
                     {"cf_version": cf_version, "epoch": epoch})
            if new:
                mlog.text("cf_version", cf_version, step)
        if log_now:
            running.clear()
            _add(interval, reset=True)
        state.update(step=step, epoch=epoch, batch_in_epoch=index + 1, cf_version=cf_version,
                     train_seconds=clock.seconds)
        if (step % cfg.checkpoint.every_steps == 0 or (timer.enabled and step == timer.checkpoint_step())) \
                and not finished:
            with timer.section("checkpoint"):
                _save_and_report(engine, state, {"step": step, "cf_version": cf_version}, rank, cfg, tokenizer,
                                 None, mlog=mlog, log=progress.line if progress is not None else None)
        timer.end_step()
        if step == kill_at and rank == 1:
            _fault_kill_once(cfg, step)
        if rank == 0 and loop_config.get("fault_pause"):
            _fault_pause(loop_config["fault_pause"], step)

    timer.finish(rank, world, profile_extra, io_join(run_folder(cfg), PROFILE_DIR), cfg.data.s3)
    heldout = {}
    if heldout_rows is not None:
        heldout = {"before": state.get("heldout_before") or {},
                   "after": evaluate_heldout(engine, heldout_rows, cfg, tokenizer, device, rank)}
        log("trained model on held-out rows:   " + _fmt(heldout["after"]))
        metrics.update(flatten_heldout(heldout))
        if mlog is not None:
            mlog.log("heldout", step, _tagged("heldout", flatten_heldout({"after": heldout["after"]})))
    if clock.budget_s > 0 and step < total:
        log(f"stopped by training.max_minutes={cfg.training.max_minutes:g} at step {step}/{total}")
    metrics.update(step=step, cf_version=cf_version, train_seconds=clock.seconds, stopped_by=clock.stopped_by(step),
                   optimizer_step=optimizer_step(engine), lr=scheduler.get_last_lr(), epoch=state["epoch"],
                   batch_in_epoch=state["batch_in_epoch"], resumed=state.get("resumed"),
                   restarts=state.get("restarts", 0), skipped_checkpoints=state.get("skipped_checkpoints", []))
    if mlog is not None:
        final = {k: v for k, v in metrics.items() if not k.startswith(("before/", "after/"))}
        mlog.log("final", step, _tagged("final", {k: v for k, v in final.items() if k != "lr"}),
                 {"cf_version": cf_version, "stopped_by": final["stopped_by"]})
        # the metrics upload waits for the storage like a checkpoint upload does (a line per probe)
        wait_for_storage_or_log(cfg, rank, progress.line if progress is not None else None)
        mlog.close()  # everything at the storage path before the final checkpoint is reported
    _save_and_report(engine, state, metrics, rank, cfg, tokenizer, export_adapter if cfg.checkpoint.export_adapter else None,
                     heldout=heldout, log=progress.line if progress is not None else None)


def _profile_facts(cfg: Config, model, device, use_gpu: bool, world: int) -> dict:
    """What the profile report needs besides the timings: the model's FLOP shape (``ckf_dist.flops``, taken
    before DeepSpeed partitions the parameters), the device and its peak, the run's switches."""
    import dataclasses

    return {"shape": dataclasses.asdict(flops.model_shape(model)), "world_size": world,
            **device_info(device, model_dtype(cfg, use_gpu), cfg.profile.peak_tflops),
            "checkpoint_every_steps": cfg.checkpoint.every_steps,
            "switches": {"zero_stage": cfg.deepspeed.zero_stage, "precision": str(model_dtype(cfg, use_gpu))[6:],
                         "gradient_checkpointing": cfg.model.gradient_checkpointing,
                         "batch_size": cfg.training.batch_size, "packing": cfg.training.packing,
                         "attn_implementation": cfg.model.attn_implementation, "lora_impl": cfg.lora.impl}}


def step_scalars(loss, running: dict, lam: float, lrs: list, group_names: list, grad_norm, interval: dict,
                 world: int, cf_swaps: int) -> dict:
    """The scalars of one logged step (``ckf_dist.metrics_log``): rank 0's loss of this step, its mean loss per
    task and prompt form since the last logged step, lambda, the lr of each parameter group, DeepSpeed's global
    gradient norm (before clipping; None when it computed none), tokens per second (rank 0's count x world
    size over the interval's step time), mean step time and the part of it spent waiting for the batch."""
    n = max(interval["steps"], 1)
    out = {"loss/total": float(loss), **{f"loss/{k}": sum(v) / len(v) for k, v in sorted(running.items())},
           "lambda": lam, **{f"lr/{name}": lr for name, lr in zip(group_names, lrs)}, "grad_norm": grad_norm,
           "throughput/tokens_per_s": interval["tokens"] * world / max(interval["seconds"], 1e-9),
           "time/step_s": interval["seconds"] / n, "time/data_wait_s": interval["wait"] / n,
           "cf/swaps": cf_swaps}
    return out


def _add(acc: dict, reset: bool = False, **values) -> None:
    for k in acc:
        acc[k] = type(acc[k])(0) if reset else acc[k] + values.get(k, 0)


def _tagged(prefix: str, values: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in values.items()}


FAULT_KILL_ENV = "CKF_FAULT_KILL_AT_STEP"  # fault injection for tests only (ckf_dist.train passes it on)


def _fault_kill_once(cfg: Config, step: int) -> None:
    """Fault injection for tests (``CKF_FAULT_KILL_AT_STEP=<n>`` in the driver's environment): rank 1 SIGKILLs
    its own process after step n, once per run folder. The marker file ``fault_injection/killed_at_step<n>``
    in the run folder, written before the kill, keeps the restarted worker from killing itself again."""
    import signal

    from ckf_dist.data import io

    fs, marker = io.get_filesystem(io.join(run_folder(cfg), "fault_injection", f"killed_at_step{step}"), cfg.data.s3)
    if io.exists(fs, marker):
        return
    io.write_bytes(fs, marker, json.dumps({"rank": 1, "step": step, "pid": os.getpid()}).encode("utf-8"))
    # The Train controller takes one report per worker per poll (every 2 s, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S):
    # waiting 3 polls lets it register the last checkpoint first, so that the test knows which one is restored.
    time.sleep(6.0)
    os.kill(os.getpid(), signal.SIGKILL)


FAULT_PAUSE_ENV = "CKF_FAULT_PAUSE_AFTER"  # fault injection for tests only: "<step>:<local folder>"


def _fault_pause(spec: str, step: int, timeout_s: float = 300.0) -> None:
    """Fault injection for tests (``CKF_FAULT_PAUSE_AFTER=<n>:<folder>`` in the driver's environment): after step
    n (its checkpoint, if any, uploaded) rank 0 writes ``<folder>/paused`` and waits for ``<folder>/go`` (at most
    ``timeout_s``), so that a test can act between two steps at a known point, e.g. stop the S3 server before the
    next checkpoint's storage probe rather than in the middle of an upload. Once per folder."""
    at, _, folder = spec.partition(":")
    if step != int(at) or os.path.exists(os.path.join(folder, "paused")):
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "paused"), "w") as f:
        f.write(str(step))
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < deadline:
        time.sleep(0.05)


def save_rng(folder: str, rank: int) -> None:
    """This rank's torch RNG state (CPU, and CUDA when present) into ``rng_rank<rank>.pt``: the LoRA dropout
    draws from it, so a resumed run continues the same random stream as an uninterrupted one."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, os.path.join(folder, f"rng_rank{rank}.pt"))


def restore_rng(folder: str, rank: int) -> bool:
    """Restores what ``save_rng`` saved for this rank; False when the checkpoint has none (an older one, or a
    different world size)."""
    path = os.path.join(folder, f"rng_rank{rank}.pt")
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (its ``.numel()`` is then 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def base_model_record(cfg: Config, model) -> dict:
    """What the frozen base of a lean checkpoint is rebuilt from (saved in the trainer state): the model source,
    its path as configured (not the node-local cache) and the number of frozen parameters."""
    return {"source": cfg.model.source, "path": cfg.model.path,
            "frozen_parameters": sum(numel(p) for p in model.parameters() if not p.requires_grad)}


def check_base_model(saved: Optional[dict], now: dict, log) -> None:
    """A lean checkpoint holds no frozen weight: resuming it on another base would silently train adapters made
    for one model on another. A different parameter count is an error; a different path only a log line (the
    same weights may have moved, e.g. a local copy of an s3:// folder)."""
    if not saved or "frozen_parameters" not in saved:
        return
    if saved["frozen_parameters"] != now["frozen_parameters"]:
        raise ValueError(f"the checkpoint was trained on a base model with {saved['frozen_parameters']:,} frozen "
                         f"parameters ({saved.get('source')} {saved.get('path')!r}); model.source={now['source']} "
                         f"model.path={now['path']!r} has {now['frozen_parameters']:,}: resume with the same model")
    if (saved.get("source"), saved.get("path")) != (now["source"], now["path"]):
        log(f"the checkpoint's base model was {saved.get('source')} {saved.get('path')!r}, now model.path="
            f"{now['path']!r} (same parameter count): its frozen weights are assumed to be the same")


def optimizer_step(engine) -> int:
    """Adam's step count as the (ZeRO-wrapped) optimizer holds it; -1 when it holds none yet."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the client optimizer
    for st in opt.state.values():
        if "step" in st:
            return int(st["step"])
    return -1


def parameter_groups(model, cfg: Config) -> list[dict]:
    """Optimizer groups: ``lora`` (every Multi-LoRA A/B; lr ``training.lr``) and ``mapping`` (meta-network,
    pooling, projectors; lr ``training.mapping_lr``, or ``training.lr`` when 0). Empty groups are dropped."""
    lora_ids = {id(p) for layer in model.modules() if layer.__class__.__name__ == "MultiLoRALinear"
                for p in layer.parameters(recurse=False) if p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "lora", "params": [p for p in trainable if id(p) in lora_ids], "lr": cfg.training.lr},
              {"name": "mapping", "params": [p for p in trainable if id(p) not in lora_ids],
               "lr": cfg.training.mapping_lr or cfg.training.lr}]
    return [g for g in groups if g["params"]]


def curriculum_gates(cfg: Config) -> list:
    """Per optimizer group (``parameter_groups`` order: lora, mapping), a function of the (effective) step that
    multiplies its learning rate, so that the curriculum lambda(s) really moves training from the text-only to
    the hybrid form. Adam ignores a constant scale of a parameter's gradient: weighting a loss that alone
    reaches a parameter group by (1 - lambda) would not slow that group at all.

    joint: the LoRAs see lambda * L_text + (1 - lambda) * L_hybrid (the weights set the mix of their gradient,
        which Adam does respect), so their lr is not gated; the mapping side, reached only by L_hybrid, is
        gated by (1 - lambda).
    spec: L_text reaches only the LoRAs, L_hybrid only the mapping side; LoRAs x lambda, mapping x (1 - lambda).
    """
    def lam(s: float) -> float:
        return _curriculum(cfg, s)

    def hybrid_gate(s: float) -> float:
        return 1.0 - lam(s)

    lora_gate = lam if cfg.training.gradient_routing == "spec" else (lambda s: 1.0)
    return [lora_gate, hybrid_gate]


def flatten_heldout(heldout: dict) -> dict[str, float]:
    from ckf_dist import heldout as H

    out = {}
    for when in ("before", "after"):
        out.update(H.flatten(heldout.get(when) or {}, when))
    return out


def _quiet_worker_warnings() -> None:
    """DeepSpeed's ZeRO-3 calls torch's deprecated collective names (a FutureWarning per call site and rank);
    nothing here can act on them. Everything else still reaches the worker's log."""
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


def _curriculum(cfg: Config, step: float) -> float:
    from ckf_dist.model.ckf import curriculum_text_weight

    return curriculum_text_weight(cfg.training.curriculum, step, cfg.training.max_steps)


def _accumulate(running: dict, row_loss: torch.Tensor, batch: dict) -> None:
    for t, name in scoring.TASK_NAMES.items():
        for hyb, form in ((False, "text"), (True, "hybrid")):
            sel = (batch["task_ids"] == t) & (batch["is_hybrid"] == hyb)
            if bool(sel.any()):
                running.setdefault(f"{name}/{form}", []).append(float(row_loss[sel].mean()))


def _fmt(report: dict) -> str:
    """One line of the held-out report's headline numbers."""
    forms = report.get("forms", {})
    parts = [f"{f} ctr/auc={m['ctr/auc']:.4f}" for f, m in forms.items() if "ctr/auc" in m]
    parts += [f"{f} topk/hr@1={m['topk/hr@1']:.4f}" for f, m in forms.items() if "topk/hr@1" in m]
    fusion = report.get("fusion")
    if fusion:
        ci = fusion["cf_effect_ci95"]
        parts.append(f"CF effect {fusion['cf_effect_auc']:+.4f} AUC"
                     + (f" (95% CI {ci[0]:+.4f}..{ci[1]:+.4f})" if ci else " (no CI: too few rows)"))
    return " ".join(parts)


def wait_for_storage_or_log(cfg: Config, rank: int, log: Optional[Callable[[str], None]]) -> None:
    """An S3 outage: wait for the storage (a log line per probe) before an upload, rather than let the upload fail
    the worker once Arrow's request retries (data.s3.retry_attempts) are spent mid-outage."""
    from ckf_dist.data.io import wait_for_storage

    say = log or (lambda msg: logging.getLogger("ckf_dist.worker").warning("[rank %d] %s", rank, msg))
    wait_for_storage(cfg.checkpoint.storage_path, cfg.data.s3, say, cfg.data.s3.outage_wait_s)


def _save_and_report(engine, state: dict, metrics: dict, rank: int, cfg: Config, tokenizer, export,
                     heldout: Optional[dict] = None, mlog: Optional[MetricsLog] = None,
                     log: Optional[Callable[[str], None]] = None) -> None:
    """Every rank writes its DeepSpeed shard files into its own temp dir; Ray Train uploads them all into the
    same checkpoint folder. Rank 0 adds the trainer state (and the adapter export at the end) and syncs the
    metrics log to the run folder (``ckf_dist.metrics_log``)."""
    import ray.train
    from ray.train import Checkpoint

    from ckf_dist.resume import write_manifest

    wait_for_storage_or_log(cfg, rank, log)
    if mlog is not None:
        mlog.sync()

    with tempfile.TemporaryDirectory(prefix="ckf_ckpt_") as tmp:
        # Lean: only what training changes. Without exclude_frozen_parameters ZeRO-3 also writes every rank's
        # fragment of the frozen base (the whole base once per checkpoint: 13.5 GB for the 7B config); here the
        # base is rebuilt from model.path on resume (check_base_model), and the files hold the trainable
        # parameters' fp32 partitions with their Adam moments, the lr scheduler and DeepSpeed's counters.
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": state["step"]}, save_latest=False,
                               exclude_frozen_parameters=True)
        if export is not None:
            export(engine.module, os.path.join(tmp, ADAPTER_DIR), cfg, tokenizer, state, write=rank == 0)
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f, indent=2)
            if heldout:
                with open(os.path.join(tmp, HELDOUT_FILE), "w") as f:
                    json.dump(heldout, f, indent=2)
        # Every rank records the embedding swaps it made (an audit that all ranks swapped at the same step) and
        # the step it saved at (all ranks stop together, also on a time budget).
        with open(os.path.join(tmp, f"cf_swaps_rank{rank}.json"), "w") as f:
            json.dump(state.get("cf_swaps", []), f)
        save_rng(tmp, rank)
        with open(os.path.join(tmp, f"step_rank{rank}.json"), "w") as f:
            json.dump({"step": state["step"], "train_seconds": state["train_seconds"]}, f)
        write_manifest(tmp, rank, ray.train.get_context().get_world_size(), state["step"])  # last (ckf_dist.resume)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
