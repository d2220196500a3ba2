"""Padding-free packing: the rows of a padded batch (``collate_prompts``) concatenated into rows of at most
``pack_tokens`` tokens, a training-step layout only (evaluation and scoring keep one sample per row).

A packed row holds samples of one task (text and hybrid forms alike), so that the Multi-LoRA segments stay
contiguous: packed rows are sorted by task and ``row_offsets`` counts packed rows per task, exactly as the padded
layout counts samples. Gradient routing (``training.gradient_routing=spec``: text-form samples train the LoRAs,
hybrid ones the mapping side) then selects tokens instead of rows (``TaskSegments.param_grad_tokens``).

Position ids restart at 0 for every sample, and the tail padding of a row is a sequence of its own (positions
0, 1, ...). With ``attention_mask=None`` transformers reads the sample boundaries from these position ids
(``masking_utils.find_packed_sequence_indices``): sdpa and eager get a block-diagonal causal mask, flex_attention
a document ``BlockMask``; for flash_attention_2 the model passes ``cu_seq_lens`` (varlen) computed from them.
Attention therefore never crosses a sample, and the loss (answer tokens only) is the padded layout's.

Samples are placed by first-fit decreasing within each task, for the row width (at most
``pack_tokens``) that computes the fewest tokens in this batch; a sample is never split. A sample
longer than the budget raises ``ValueError`` (``validate`` already requires ``training.pack_tokens >=
data.max_seq_len``, which bounds every tokenised sample, so this only fires on a misconfigured caller).
"""
from __future__ import annotations

import numpy as np
import torch

from ckf_dist.data.collate import IGNORE

# Per-sample columns of a padded batch that a packed batch keeps as they are (index = row of the padded batch).
SAMPLE_KEYS = ("task_ids", "is_hybrid", "user_ids", "n_targets", "history", "targets", "label", "sample_index",
               "score_pos")


def first_fit_decreasing(lengths: np.ndarray, groups: np.ndarray, budget: int) -> list[list[int]]:
    """Bins of row indices, each of total length <= ``budget`` and within one group; bins ordered by group
    (ascending), then by creation; indices ascending inside a bin. Every row lands in exactly one bin.

    lengths [S] int (each >= 1), groups [S] int. Raises ValueError for a row longer than ``budget``.
    """
    too_long = np.flatnonzero(lengths > budget)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"batch row {i} has {int(lengths[i])} tokens, more than training.pack_tokens={budget} "
                         f"({too_long.size} such rows): a sample is never split, so raise training.pack_tokens to at "
                         f"least data.max_seq_len")
    bins: list[list[int]] = []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        rows = rows[np.argsort(-lengths[rows], kind="stable")]  # longest first, ties by row index
        group_bins: list[list[int]] = []
        room = np.empty(len(rows), dtype=np.int64)
        for r in rows.tolist():
            n = int(lengths[r])
            fits = np.flatnonzero(room[:len(group_bins)] >= n)
            if fits.size:
                group_bins[fits[0]].append(r)
                room[fits[0]] -= n
            else:
                room[len(group_bins)] = budget - n
                group_bins.append([r])
        bins.extend(sorted(b) for b in group_bins)
    return bins


def choose_bins(lengths: np.ndarray, groups: np.ndarray, pack_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bins for the row width, among the longest sample's length times 2^(j/2) up to
    ``pack_tokens`` (and ``pack_tokens`` itself), that computes the fewest tokens (rows x width of the widest
    bin; ties: the narrower width, whose attention is cheaper). A budget far above what a batch needs would
    otherwise leave most of every task's short last row as padding. The narrowest candidate is the
    padded layout's own width, so packing never computes more tokens than padding."""
    longest = int(lengths.max(initial=1))
    widths, w = {pack_tokens}, float(longest)
    while w < pack_tokens:
        widths.add(int(w))
        w *= 2 ** 0.5
    best, best_cost = None, None
    for width in sorted(widths):
        bins = first_fit_decreasing(lengths, groups, width)
        used = max((int(lengths[b].sum()) for b in bins), default=1)
        cost = len(bins) * used
        if best_cost is None or cost < best_cost:
            best, best_cost = bins, cost
    return best


def pack_batch(batch: dict, pack_tokens: int, pad_id: int, num_tasks: int) -> dict:
    """Packs a padded batch (``collate_prompts`` output, B sample rows) into R <= B rows of at most
    ``pack_tokens`` tokens (the width computing the fewest tokens: ``choose_bins``).

    Output:
        input_ids [R, N] (``pad_id`` at each row's tail), labels [R, N] (IGNORE on prompt tokens and padding),
        position_ids [R, N] (restart at 0 per sample and for the tail padding), seq_ids [R, N] int64: the padded
        batch row (sample) of each token, -1 on padding; N = the longest packed row (<= ``pack_tokens``).
        row_offsets [num_tasks + 1] over the R packed rows; row_task_ids [R].
        The per-sample columns (``SAMPLE_KEYS``: task_ids, is_hybrid, user_ids, ... [B, ...]) unchanged.
        No ``attention_mask``: the model passes none, so that the packed position ids define the attention.
    """
    if pack_tokens < 1:
        raise ValueError(f"training.pack_tokens={pack_tokens} must be >= 1")
    mask = batch["attention_mask"].numpy().astype(bool)  # [B, L] right-padded
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    lengths = mask.sum(1)
    task = batch["task_ids"].numpy().astype(np.int64)
    if lengths.size and lengths.min() < 1:
        raise ValueError(f"batch row {int(np.argmin(lengths))} has no tokens")
    first_label = labels[np.arange(len(labels)), 0] if labels.size else labels
    if (first_label != IGNORE).any():
        # the first token of a sample is predicted by the previous sample's last token in a packed row
        raise ValueError(f"batch rows {np.flatnonzero(first_label != IGNORE)[:5].tolist()} start with an answer "
                         f"token: packing needs a prompt token first")
    bins = choose_bins(lengths, task, pack_tokens)
    width = max((int(lengths[b].sum()) for b in bins), default=1)
    n_rows = len(bins)
    out_ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    out_labels = np.full((n_rows, width), IGNORE, dtype=np.int64)
    out_pos = np.zeros((n_rows, width), dtype=np.int64)
    out_seq = np.full((n_rows, width), -1, dtype=np.int64)
    for r, rows in enumerate(bins):
        at = 0
        for s in rows:
            n = int(lengths[s])
            out_ids[r, at:at + n] = ids[s, :n]
            out_labels[r, at:at + n] = labels[s, :n]
            out_pos[r, at:at + n] = np.arange(n)
            out_seq[r, at:at + n] = s
            at += n
        out_pos[r, at:] = np.arange(width - at)
    row_task = np.asarray([task[b[0]] for b in bins], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row_task, minlength=num_tasks))])
    out = {k: batch[k] for k in SAMPLE_KEYS if k in batch}
    out.update({
        "input_ids": torch.from_numpy(out_ids),
        "labels": torch.from_numpy(out_labels),
        "position_ids": torch.from_numpy(out_pos),
        "seq_ids": torch.from_numpy(out_seq),
        "row_offsets": torch.from_numpy(offsets.astype(np.int64)),
        "row_task_ids": torch.from_numpy(row_task),
    })
    return out


def is_packed(batch: dict) -> bool:
    return "seq_ids" in batch


def token_counts(batch: dict) -> tuple[int, int]:
    """(real tokens, tokens the step computes on incl. padding) of a padded or packed batch."""
    real = batch["seq_ids"] >= 0 if is_packed(batch) else batch["attention_mask"]
    return int(real.sum()), int(batch["input_ids"].numel())
