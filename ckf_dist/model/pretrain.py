"""A pretrained base for the tiny CPU model: causal-LM pretraining on the training split's text-form prompts.

CKF freezes a *pretrained* LLM and fuses CF knowledge into it. A random frozen 2-layer LLaMA knows no
language, so nothing it computes relates titles to tastes, and no soft token can steer it: with a random base
the default run's CTR AUC never passed 0.61 whatever was tuned (issue 9). This module gives the tiny model
what a real LLM brings: it pretrains the tiny LLaMA as an ordinary causal LM (next-token loss on every token)
on the text-only prompts of the **training split** together with their answers, for
``model.tiny.pretrain_steps`` steps, once per prepared data set, then the training job freezes it like any
pretrained base. Only the training split is read: the base model never sees a valid or test prompt, nor any
CF embedding (it sees the same text the text-only form of CKF sees in training).

The result is cached as a folder beside the data set (local or S3)::

    <data.path>/base_models/tiny-<key>/model.safetensors   the LLaMA weights (the <cf> row included)
    <data.path>/base_models/tiny-<key>/config.json         the HF LlamaConfig
    <data.path>/base_models/tiny-<key>/pretrain.json       what it saw: split, rows, steps, losses, seconds

``key`` hashes the data set's manifest, the tokenizer's vocabulary, ``model.tiny`` and ``model.seed``, so a
re-prepared data set or another tiny shape gets its own base. ``pretrain.json`` is written last: a folder
without it is incomplete and is rebuilt. ``build_llm`` loads the weights when ``model.path`` names such a
folder (the driver sets it; the path then travels with the config into workers, checkpoints and exports).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from ckf_dist.config import Config, resolve_data_path
from ckf_dist.data import io

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RECORD = "pretrain.json"  # written last: marks the folder complete
IGNORE = -100


def base_model_key(cfg: Config, tokenizer, data_manifest: dict) -> str:
    """12 hex digits identifying (data set, tokenizer, tiny shape, pretraining settings, seed)."""
    from ckf_dist.cf.binding import data_manifest_hash

    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps({"data": data_manifest_hash(data_manifest), "vocab": vocab,
                       "tiny": {k: v for k, v in vars(cfg.model.tiny).items()}, "seed": cfg.model.seed,
                       "max_seq_len": cfg.data.max_seq_len}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def ensure_tiny_base(cfg: Config, tokenizer, data_manifest: dict, progress: Callable[[str], None] = print) -> str:
    """The folder of the pretrained tiny base for this data set; pretrains and publishes it when missing."""
    root = io.join(resolve_data_path(cfg), "base_models", f"tiny-{base_model_key(cfg, tokenizer, data_manifest)}")
    fs, path = io.get_filesystem(root, cfg.data.s3)
    if io.exists(fs, io.join(path, RECORD)):
        record = io.read_json(fs, io.join(path, RECORD))
        progress(f"pretrained tiny base: {root} ({record['steps']} steps on {record['rows']:,} train prompts, "
                 f"final LM loss {record['final_loss']:.3f})")
        return root
    progress(f"pretraining the tiny base LLaMA ({cfg.model.tiny.pretrain_steps} steps of causal-LM on the train "
             f"split's text prompts + answers) -> {root}")
    model, record = pretrain_tiny(cfg, tokenizer, progress)
    with tempfile.TemporaryDirectory(prefix="ckf_base_") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in (WEIGHTS, CONFIG):
            with open(os.path.join(tmp, name), "rb") as f:
                io.write_bytes(fs, io.join(path, name), f.read())
    io.write_json(fs, io.join(path, RECORD), record)  # last
    return root


def train_sequences(cfg: Config, tokenizer) -> list[list[int]]:
    """Token ids of every training-split prompt in text form followed by its answer and eos (the same
    tokenisation as training: ``streaming.tokenize_batch``, BOS where the tokenizer adds one)."""
    from ckf_dist.data.streaming import PROMPT_COLUMNS, tokenize_batch

    fs, p = io.get_filesystem(resolve_data_path(cfg), cfg.data.s3)
    files = io.list_files(fs, io.join(p, "prompts", "train"), ".parquet")
    seqs: list[list[int]] = []
    for f in files:
        table = pq.read_table(f, filesystem=fs, columns=PROMPT_COLUMNS)
        tok = tokenize_batch(table, tokenizer, cfg.data.max_seq_len)
        seqs.extend(p_ + a for p_, a in zip(tok.column("text_prompt_ids").to_pylist(),
                                           tok.column("answer_ids").to_pylist()))
    if not seqs:
        raise ValueError(f"no training prompts under {resolve_data_path(cfg)}/prompts/train to pretrain on")
    return seqs


def pretrain_tiny(cfg: Config, tokenizer, progress: Callable[[str], None] = print):
    """Random tiny LLaMA -> causal LM trained on ``train_sequences``; returns (model, record dict).

    AdamW, ``pretrain_lr`` with 50 warm-up steps then linear decay, batches of ``pretrain_batch_size``
    sequences drawn without replacement within a step, gradient clipping at 1.0, one CPU thread per rank
    as configured by the caller. Deterministic for a given seed and data.
    """
    from ckf_dist.model.llm import build_llm

    t = cfg.model.tiny
    t0 = time.perf_counter()
    seqs = train_sequences(cfg, tokenizer)
    model = build_llm(cfg.model, tokenizer)  # random init, seeded by model.seed
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.pretrain_lr, weight_decay=0.0)
    warmup = min(50, max(1, t.pretrain_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / t.pretrain_steps))
    rng = np.random.default_rng(cfg.model.seed)
    pad = tokenizer.pad_token_id
    losses = []
    for step in range(t.pretrain_steps):
        idx = rng.choice(len(seqs), size=min(t.pretrain_batch_size, len(seqs)), replace=False)
        batch = [seqs[i] for i in idx]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(batch):
            ids[j, :len(s)] = torch.as_tensor(s)
            mask[j, :len(s)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, IGNORE)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, t.pretrain_steps // 5) == 0 or step + 1 == t.pretrain_steps:
            progress(f"[pretrain] step {step + 1}/{t.pretrain_steps} LM loss {np.mean(losses[-50:]):.3f} "
                     f"({time.perf_counter() - t0:.0f}s)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    record = {"format": 1, "split": "train", "form": "text", "rows": len(seqs), "steps": t.pretrain_steps,
              "batch_size": t.pretrain_batch_size, "lr": t.pretrain_lr,
              "first_loss": losses[0], "final_loss": float(np.mean(losses[-50:])),
              "seconds": round(time.perf_counter() - t0, 1),
              "saw": "causal-LM loss on every token of the training split's text-form prompts + answers; "
                     "no valid/test rows, no CF embeddings"}
    return model, record


def load_tiny_weights(model: torch.nn.Module, path: str, s3=None) -> None:
    """Copies the pretrained weights at ``path`` (a folder written by ``ensure_tiny_base``, local or S3) into
    a freshly built tiny LLaMA of the same shape; names and shapes must match exactly."""
    from safetensors.torch import load

    fs, p = io.get_filesystem(path, s3)
    if not io.exists(fs, io.join(p, RECORD)):
        raise FileNotFoundError(f"model.path={path!r}: not a complete pretrained tiny base ({RECORD} missing)")
    with fs.open_input_stream(io.join(p, WEIGHTS)) as f:
        state = load(f.read())
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if bad:
        raise ValueError(f"model.path={path!r} does not fit model.tiny (tensors {bad[:5]} differ): it was "
                         "pretrained for another tiny shape or tokenizer")
    model.load_state_dict(state)
