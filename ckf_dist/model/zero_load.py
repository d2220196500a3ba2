"""Sharded creation of an HF causal LM under DeepSpeed ZeRO-3: no rank ever holds the whole model.

``build_llm`` calls ``load_hf_zero3`` when ``model.zero_init`` is on (auto: an ``hf`` model under ZeRO-3). The
model is created inside ``deepspeed.zero.Init``, which partitions each module's parameters as the module is
built (each rank keeps a flat 1/world slice of every tensor, ``param.ds_tensor``), with transformers' weight
init switched off as its own ZeRO-3 path does. Then every rank reads *its own slice* of every tensor from the
safetensors files with plain positioned reads (no memory map: mapped pages would count in the process's RSS),
one tensor at a time: the base weights a rank ever holds are its 1/world share plus one tensor slice. No
all-gather, no broadcast.

transformers' own route (``HfDeepSpeedConfig`` + ``from_pretrained``) has rank 0 read the whole checkpoint and
broadcast it layer by layer: rank 0 then holds the whole model (13.5 GB for a 7B in bf16).

Parameters created after this (the Multi-LoRA adapters, the mapping side) are ordinary tensors; DeepSpeed
partitions them when the engine is built (``deepspeed.initialize`` converts every parameter it finds without
ZeRO-3 attributes).
"""
from __future__ import annotations

import json
import os
import struct

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def safetensors_index(folder: str) -> dict[str, tuple[str, dict, int]]:
    """{tensor name: (file, header entry {dtype, shape, data_offsets}, offset of the file's data section)} over
    the folder's ``model.safetensors`` or the files of ``model.safetensors.index.json``."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"model.zero_init: {folder} has no model.safetensors(.index.json); the sharded "
                                f"loader reads safetensors only (convert the weights, or set model.zero_init=false)")
    out = {}
    for name in files:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, entry in header.items():
            out[key] = (path, entry, 8 + n)
    return out


def read_flat_range(path: str, entry: dict, data_start: int, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor ``entry`` of the safetensors file ``path``."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    item = torch.empty((), dtype=dtype).element_size()
    first = data_start + entry["data_offsets"][0] + start * item
    buf = bytearray((stop - start) * item)
    with open(path, "rb") as f:
        f.seek(first)
        if f.readinto(buf) != len(buf):
            raise OSError(f"{path}: truncated data for a tensor (wanted {len(buf)} bytes at {first})")
    return torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)


def load_partitions(model: torch.nn.Module, folder: str) -> None:
    """Copies this rank's slice of every parameter of ``model`` (created under ``deepspeed.zero.Init``) from the
    safetensors files of ``folder``. A parameter larger than its file tensor along dim 0 (the embedding and
    output rows added for ``<cf>``) gets zeros in the extra rows, as ``build_llm``'s unsharded resize does."""
    import torch.distributed as dist

    index = safetensors_index(folder)
    named = dict(model.named_parameters())  # a tied output head appears once, under its first name
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(n for n in named if n not in index)
    unknown = sorted(k for k in index if k not in aliases)
    if missing or unknown:
        raise ValueError(f"model.zero_init: the safetensors in {folder} do not match the model's parameter names "
                         f"(missing {missing[:5]}, unknown {unknown[:5]}); set model.zero_init=false")
    for name, p in named.items():
        path, entry, data_start = index[name]
        full, file_shape = tuple(p.ds_shape), tuple(entry["shape"])
        if file_shape != full and not (len(full) == len(file_shape) and full[1:] == file_shape[1:]
                                       and file_shape[0] <= full[0]):
            raise ValueError(f"model.zero_init: {name} has shape {file_shape} in {path}, the model {full}")
        part = p.ds_tensor
        size = part.ds_numel  # the partition (the last one padded)
        start = size * dist.get_rank(group=p.ds_process_group)
        stop = min(start + size, p.ds_numel)
        in_file = min(stop, int(torch.Size(file_shape).numel()))  # beyond: rows added to the table, zeros
        with torch.no_grad():
            part.data.zero_()
            if in_file > start:
                part.data[: in_file - start].copy_(read_flat_range(path, entry, data_start, start, in_file))


def load_hf_zero3(path: str, vocab_size: int, dtype: torch.dtype, attn_implementation: str,
                  ds_config: dict) -> torch.nn.Module:
    """The HF causal LM of the local folder ``path``, created partitioned under ZeRO-3 (``ds_config``), with an
    embedding table (and output head) of at least ``vocab_size`` rows, its weights read shard by shard."""
    import contextlib

    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:  # older transformers: no such guard
        prevent_arange_dtype_change = contextlib.nullcontext

    # DeepSpeed's communication layer over the process group Ray Train (or the caller) set up: zero.Init sizes
    # its partitions (and checks the batch sizes of ds_config) by its world size.
    deepspeed.init_distributed()
    config = AutoConfig.from_pretrained(path)
    # The <cf> rows are part of the model from the start: resizing a partitioned table would gather it whole.
    config.vocab_size = max(config.vocab_size, vocab_size)
    # transformers' own ZeRO-3 creation (PreTrainedModel._from_config): no weight init (every value is read
    # afterwards), RoPE buffers kept in fp32, parameters partitioned module by module.
    # zero.Init takes the partitions' dtype from ds_config (bf16 / fp16 / fp32): its ``dtype`` argument is ignored
    # on an accelerator without fp16 (deepspeed 0.19.8 picks bf16 on CPU), so it is not passed; ds_config and
    # ``dtype`` come from the same deepspeed.precision (ckf_dist.worker), checked below.
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # a tied output head (tie_word_embeddings): skipped with the weight init, as transformers does
    got = {p.dtype for p in model.parameters()}
    if got != {dtype}:
        raise ValueError(f"model.zero_init: the partitioned model has dtype {sorted(map(str, got))}, not {dtype}: "
                         f"the DeepSpeed config's precision must match")
    load_partitions(model, path)
    return model
