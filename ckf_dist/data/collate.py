"""Tokenised prompt rows -> padded model batches, rows sorted by task with per-task segment offsets.

Each sample yields up to two rows: its text-only form and its hybrid form (``forms``). Rows are stably sorted
by task id so that a Multi-LoRA layer sees each task's rows as one contiguous segment; the offsets are
computed here once per batch and shared by every layer.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

IGNORE = -100
FORMS = ("text", "hybrid")


def _pad_2d(seqs: Sequence[np.ndarray], value: int, length: int) -> np.ndarray:
    out = np.full((len(seqs), length), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def collate_prompts(batch: Mapping[str, np.ndarray], pad_id: int, num_tasks: int,
                    forms: Sequence[str] = FORMS) -> dict[str, torch.Tensor]:
    """Builds one model batch from tokenised rows (the output columns of ``streaming.tokenize_batch``).

    Input: numpy columns over S samples; list columns are object arrays of int arrays.
    Output (B = S * len(forms) rows, sorted by task):
        input_ids, labels, attention_mask: [B, L] (labels = IGNORE on prompt and padding tokens)
        task_ids [B] int64 (non-decreasing), is_hybrid [B] bool, user_ids [B], n_targets [B]
        history [B, H] and targets [B, K] item ids padded with -1; label [B] float; sample_index [B] (row in S)
        row_offsets [num_tasks + 1] int64: task t's rows are row_offsets[t]:row_offsets[t+1]
    """
    for f in forms:
        if f not in FORMS:
            raise ValueError(f"unknown prompt form {f!r}; expected one of {FORMS}")
    n = len(batch["task_id"])
    seqs, labels, form_flag, src = [], [], [], []
    for form in forms:
        prompts = batch[f"{form}_prompt_ids"]
        for i in range(n):
            p = np.asarray(prompts[i], dtype=np.int64)
            a = np.asarray(batch["answer_ids"][i], dtype=np.int64)
            seqs.append(np.concatenate([p, a]))
            labels.append(np.concatenate([np.full(len(p), IGNORE, dtype=np.int64), a]))
            form_flag.append(form == "hybrid")
            src.append(i)
    src = np.asarray(src, dtype=np.int64)
    task = np.asarray(batch["task_id"], dtype=np.int64)[src]
    if task.size and (task.min() < 0 or task.max() >= num_tasks):
        raise ValueError(f"task ids {sorted(set(task.tolist()))} outside 0..{num_tasks - 1}")
    order = np.argsort(task, kind="stable")
    length = max((len(s) for s in seqs), default=1)
    input_ids = _pad_2d([seqs[j] for j in order], pad_id, length)
    label_ids = _pad_2d([labels[j] for j in order], IGNORE, length)
    attn = _pad_2d([np.ones(len(seqs[j]), dtype=np.int64) for j in order], 0, length)
    src = src[order]
    hist = [np.asarray(batch["history_item_ids"][i], dtype=np.int64) for i in src]
    targ = [np.asarray(batch["target_item_ids"][i], dtype=np.int64) for i in src]
    counts = np.bincount(task[order], minlength=num_tasks)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(label_ids),
        "attention_mask": torch.from_numpy(attn),
        "task_ids": torch.from_numpy(task[order]),
        "is_hybrid": torch.from_numpy(np.asarray(form_flag)[order]),
        "user_ids": torch.from_numpy(np.asarray(batch["user_id"], dtype=np.int64)[src]),
        "n_targets": torch.from_numpy(np.asarray([len(t) for t in targ], dtype=np.int64)),
        "history": torch.from_numpy(_pad_2d(hist, -1, max((len(h) for h in hist), default=0) or 1)),
        "targets": torch.from_numpy(_pad_2d(targ, -1, max((len(t) for t in targ), default=0) or 1)),
        "label": torch.from_numpy(np.asarray(batch["label"], dtype=np.float32)[src]),
        "sample_index": torch.from_numpy(src),
        "row_offsets": torch.from_numpy(offsets.astype(np.int64)),
    }


def prompt_collate_fn(pad_id: int, num_tasks: int, forms: Sequence[str] = FORMS, pack_tokens: int = 0):
    """``collate_prompts`` as the collate object ``Dataset.iter_torch_batches(collate_fn=...)`` takes: Ray Data
    >= 2.47 wants a callable class deriving from ``NumpyBatchCollateFn`` (numpy column batches in, our tensor
    dict out; a plain function is deprecated and warned about on every epoch). Ray is imported here, not at
    module import, so that the collate function itself stays usable without Ray Data.

    ``pack_tokens`` > 0: the padded batch is then packed into rows of at most that many tokens
    (``ckf_dist.data.packing.pack_batch``), off the training step's path like the collation itself."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    from ckf_dist.data.packing import pack_batch

    class PromptCollate(NumpyBatchCollateFn):
        def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
            out = collate_prompts(batch, pad_id, num_tasks, forms)
            return pack_batch(out, pack_tokens, pad_id, num_tasks) if pack_tokens > 0 else out

    return PromptCollate()


def to_device(batch: dict, device: torch.device) -> dict:
    """Moves every tensor; row_offsets too (kernels read them on device, the CPU reference syncs)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
