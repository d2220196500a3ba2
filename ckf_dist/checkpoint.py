"""Adapter export (LoRA + mapping weights) and loading, correct under ZeRO-3.

Under ZeRO-3 each rank holds only a slice of every parameter; reading ``p.data`` directly would save empty
tensors. ``export_adapter`` gathers the trainable parameters on every rank (a collective: all ranks call it)
and rank 0 writes them with safetensors, beside the tokenizer and a JSON description.

    <dir>/adapter.safetensors   trainable tensors by qualified name (Multi-LoRA A/B, meta-net, projectors)
    <dir>/adapter_config.json   config snapshot, step, CF embedding version, tensor list
    <dir>/tokenizer/            the tokenizer (with the <cf> token) the adapter was trained with
    <dir>/item_repr.npy, .json  with cf.mutual: the LLM side's item representations (ckf_dist.mutual)
"""
from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import load_file, save_file

from ckf_dist.config import Config, to_yaml

WEIGHTS = "adapter.safetensors"
META = "adapter_config.json"


def redacted(cfg: Config) -> Config:
    """A copy without S3 credentials (exports are shared; readers take credentials from their environment)."""
    safe = copy.deepcopy(cfg)
    safe.data.s3.access_key_id = ""
    safe.data.s3.secret_access_key = ""
    return safe


def gather_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies on CPU of every trainable parameter. Collective under ZeRO-3."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def export_adapter(model: torch.nn.Module, out_dir: str, cfg: Config, tokenizer, state: dict, write: bool) -> None:
    """Collective: every rank calls it (ZeRO-3 gathers); rank 0 passes ``write``. With ``cf.mutual`` every rank
    also runs its share of the item-representation forward passes (``mutual.export_item_representations``)."""
    tensors = gather_trainable_state(model)
    if cfg.cf.mutual:
        from ckf_dist.mutual import export_item_representations

        export_item_representations(model, out_dir, cfg, tokenizer, state, write)
    if not write:
        return
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS))
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    meta = {"step": state.get("step"), "cf_version": state.get("cf_version"), "config_yaml": to_yaml(redacted(cfg)),
            "tensors": {n: list(t.shape) for n, t in tensors.items()}, "format": 1}
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=2)


def load_adapter(model: torch.nn.Module, adapter_dir: str) -> dict:
    """Loads an exported adapter into a freshly built CKF model; names and shapes must match exactly."""
    path = os.path.join(adapter_dir, WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {WEIGHTS} in {adapter_dir}")
    tensors = load_file(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    if unknown or missing:
        raise ValueError(f"adapter {adapter_dir} does not fit the model: unknown tensors {unknown[:5]}, "
                         f"missing {missing[:5]}")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise ValueError(f"adapter tensor {n}: shape {tuple(t.shape)} != model {tuple(params[n].shape)}")
            params[n].copy_(t)
    with open(os.path.join(adapter_dir, META)) as f:
        return json.load(f)
