"""Model FLOPs of one CKF training step, for the MFU of ``python -m ckf_dist.profile`` (README "Profiling throughput").

A linear map with weight [out, in] costs 2 * in * out FLOPs per token forward, as much again for the gradient of
its input, and as much again for the gradient of its weight. CKF trains only the adapters and the mapping side:

- frozen base linear layers (q, k, v, o, gate, up, down of every decoder layer): forward + input gradient
  (the gradient must flow through them to the LoRAs below and to the soft tokens), no weight gradient:
  ``4 * N_base`` per token, N_base = the decoder's linear weights (embeddings are lookups: 0);
- the output head runs only on the positions that predict an answer token (``CKFModel.forward``): ``4 * V * h``
  per such position;
- every Multi-LoRA layer: the shared adapter (where placed) and the row's task adapter, each A [r, in] and
  B [out, r]: forward + input gradient + weight gradient = ``6 * r * (in + out)`` per adapter and token;
- causal attention (no weights; its inputs need gradients): QK^T and PV forward, twice that backward, over the
  causal half of the square: ``6 * h_q * l * (l + 1)`` per layer for a sample of l tokens (h_q = query heads x
  head dim; grouped kv heads do not reduce the matmuls);
- the mapping side: ``6 *`` (meta-network + pooling + user projector parameters) per hybrid sample, and ``6 *``
  item projector parameters per item soft token.

Norms, activations, rotary embeddings, softmax and the loss are not counted (the usual convention). Only real
tokens count: padding is computed but is not model work, so packing raises MFU and padding lowers it.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a CKF model (plain numbers: it travels as JSON)."""

    layers: int
    attn_width: int           # h_q = num_attention_heads * head_dim
    base_linear_params: int   # every decoder linear weight (frozen), in * out summed
    head_params: int          # output head V * h
    lora_params_per_token: int  # sum over Multi-LoRA layers of r * (in + out) * (shared + task adapters)
    mapping_per_sample_params: int  # meta-network + pooling + user projector
    item_proj_params: int     # item projector (once per item soft token)


def _shape(p: torch.Tensor) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter keeps its full shape here


def _numel(module: nn.Module) -> int:
    total = 0
    for p in module.parameters():
        n = 1
        for d in _shape(p):
            n *= d
        total += n
    return total


def model_shape(model) -> ModelShape:
    """The ``ModelShape`` of a ``CKFModel`` (``ckf_dist.model.ckf``)."""
    from ckf_dist.model.multi_lora import MultiLoRALinear

    config = model.llm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    base = lora = 0
    for m in model.llm.get_decoder().modules():
        if isinstance(m, (nn.Linear, MultiLoRALinear)):
            base += m.in_features * m.out_features
        if isinstance(m, MultiLoRALinear):
            for a in (m.shared_a, m.task_a):
                if a is not None:
                    lora += _shape(a)[-2] * (m.in_features + m.out_features)
    head = model.llm.get_output_embeddings()
    used = (model.pooling, model.user_proj) if model.identity_mapping else (model.meta_net, model.pooling, model.user_proj)
    per_sample = sum(_numel(m) for m in used)  # cf.identity_mapping: the meta-network is not run
    return ModelShape(layers=config.num_hidden_layers, attn_width=heads * head_dim, base_linear_params=base,
                      head_params=_numel(head), lora_params_per_token=lora, mapping_per_sample_params=per_sample,
                      item_proj_params=_numel(model.item_proj))


def step_counts(batch: dict, placeholder_id: int) -> dict:
    """What one collated batch (padded or packed, ``ckf_dist.data.collate``) puts through the model:
    tokens (real), padded_tokens (computed on), samples (prompt rows; each example's text and hybrid forms
    are two), attn_pairs (sum over samples of l * (l + 1)), answer_positions (outputs the head runs on),
    hybrid_samples, item_soft_tokens."""
    from ckf_dist.data.collate import IGNORE

    n_samples = int(batch["task_ids"].shape[0])
    if "seq_ids" in batch:
        seq = batch["seq_ids"]
        lengths = torch.bincount(seq[seq >= 0].flatten(), minlength=n_samples)
    else:
        lengths = batch["attention_mask"].sum(1)
    lengths = lengths.long()
    hybrid = int(batch["is_hybrid"].sum())
    soft = int((batch["input_ids"] == placeholder_id).sum())
    return {"tokens": int(lengths.sum()), "padded_tokens": int(batch["input_ids"].numel()), "samples": n_samples,
            "attn_pairs": int((lengths * (lengths + 1)).sum()),
            "answer_positions": int((batch["labels"][:, 1:] != IGNORE).sum()),
            "hybrid_samples": hybrid, "item_soft_tokens": soft - hybrid}


def step_flops(shape: ModelShape, counts: dict) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward) by part, and their ``total``; ``counts`` as
    ``step_counts`` returns (or their sums over several steps)."""
    tokens = counts["tokens"]
    parts = {
        "base_linear": 4.0 * shape.base_linear_params * tokens,
        "output_head": 4.0 * shape.head_params * counts["answer_positions"],
        "lora": 6.0 * shape.lora_params_per_token * tokens,
        "attention": 6.0 * shape.attn_width * shape.layers * counts["attn_pairs"],
        "mapping": 6.0 * (shape.mapping_per_sample_params * counts["hybrid_samples"]
                          + shape.item_proj_params * counts["item_soft_tokens"]),
    }
    parts["total"] = sum(parts.values())
    return parts


# Dense bf16 peak TFLOP/s per GPU (vendor data sheets; SXM parts, no sparsity). Matched against the device name.
PEAK_TFLOPS_BF16 = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def table_peak_tflops(device_name: str) -> float | None:
    """The table's bf16 peak for a device name (e.g. "NVIDIA H100 80GB HBM3"), None when it is not listed."""
    for key, value in PEAK_TFLOPS_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


def matmul_probe_tflops(device: torch.device, dtype: torch.dtype, size: int = 0, repeats: int = 5) -> float:
    """A measured peak: the best of ``repeats`` square matmuls of ``size`` (2 * size^3 FLOPs each) in ``dtype``
    on ``device``, in TFLOP/s. Default size: 8192 on a GPU, 1024 on a CPU (about 0.1 s per matmul on one core)."""
    import time

    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (library init, page faults)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size ** 3 / best / 1e12
