"""Mutual learning between the LLM side and the CF model (arXiv 2311.03778; ``cf.mutual``).

The two sides alternate: a training run (``python -m ckf_dist.train cf.mutual=true``) exports, with its adapter,
the LLM's representation of every item; the next CF refresh (``ckf_dist.cf_refresh``) pulls the CF vectors
toward what those representations explain, then the LLM trains on the refreshed tables, and so on.

Export (``export_item_representations``, called by ``checkpoint.export_adapter``)::

    <adapter>/item_repr.npy    float32 [num_items, hidden], row i = item id i
    <adapter>/item_repr.json   cf_version, step, num_items, hidden, data_manifest_sha256, prompt, how

Item i's representation is the decoder's final hidden state at the last position of the hybrid prompt
``"The user <cf> considers: {title_i} <cf>"`` (``ITEM_PROMPT``) with the topk task's LoRA, the user slot taking
the fallback row (user id -1) and the item slot item i's soft token: the LLM's reading of the item's title and
its CF token together.

Refresh (``load_item_representations``, ``ridge_map``, ``mutual_loss``): R [I, h] (the representations) is
mapped into the CF space by a ridge map fitted on the current CF item vectors, ``(R - mean R) W + mean E ~ E_V``;
the target of item i is its row of the fitted values (the part of its CF vector the LLM's representation
explains); a user's target is the mean target of its train-split items. The CF loss gains
``cf.mutual_weight * (mean_b ||E_V[i_b] - t_V[i_b]||^2 + mean_b ||E_U[u_b] - t_U[u_b]||^2)`` over the batch's
positive pairs (u_b, i_b). The map is refitted at the start of every epoch (``trainer.train_cf``), so the
targets follow the CF space as it trains instead of anchoring it to the warm-start vectors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ckf_dist.config import Config, S3Config
from ckf_dist.data import io

REPR_FILE = "item_repr.npy"
REPR_META = "item_repr.json"
ITEM_PROMPT = "The user {ph} considers: {title} {ph}"  # 2 placeholders: the user slot (fallback), the item


# ------------------------------------------------------------------------------------------- export side
def item_titles(cfg: Config) -> list[str]:
    """Titles by data-set item id from ``<data>/items`` (ids must be contiguous 0..num_items-1)."""
    import pyarrow.parquet as pq

    from ckf_dist.config import resolve_data_path

    root = resolve_data_path(cfg)
    fs, p = io.get_filesystem(root, cfg.data.s3)
    t = pq.read_table(io.join(p, "items"), filesystem=fs, columns=["item_id", "title"])
    ids = np.asarray(t.column("item_id").to_numpy(), dtype=np.int64)
    if not np.array_equal(np.sort(ids), np.arange(len(ids))):
        raise ValueError(f"{root}/items: item ids are not contiguous 0..{len(ids) - 1}")
    titles = [""] * len(ids)
    for i, title in zip(ids.tolist(), t.column("title").to_pylist()):
        titles[i] = title or f"item {i}"
    return titles


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def item_representations(model, tokenizer, titles: list[str], batch_size: int = 32) -> np.ndarray:
    """The LLM side's representation of every item: float32 [len(titles), hidden] (see the module docstring).

    ``model`` is a ``CKFModel`` (or DeepSpeed's ``engine.module``). Under ZeRO-3 the forward passes gather
    the partitioned parameters collectively, so every rank must call this with the same titles: the items are
    split into one contiguous slice per rank, every rank runs the same number of batches (a rank whose slice
    is short repeats its last item), and the slices are all-gathered, so each rank returns the whole array.
    Deterministic: the model is put in eval mode (no LoRA dropout) for the duration.
    """
    import torch.distributed as dist

    from ckf_dist.data.schema import PLACEHOLDER, TASK_IDS
    from ckf_dist.data.streaming import prompt_prefix_ids

    n = len(titles)
    rank, world = _rank_world()
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank))) or [n - 1]  # an idle rank still runs
    steps = -(-per_rank // batch_size)
    device = next(model.parameters()).device
    prefix = prompt_prefix_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(steps):
            items = mine[s * batch_size:(s + 1) * batch_size] or mine[-1:]
            texts = [ITEM_PROMPT.format(ph=PLACEHOLDER, title=titles[i].replace(PLACEHOLDER, "(cf)")) for i in items]
            prompts = [prefix + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            b, length = len(prompts), max(len(p) for p in prompts)
            ids = torch.full((b, length), pad_id, dtype=torch.long)
            mask = torch.zeros((b, length), dtype=torch.long)
            for r, p in enumerate(prompts):  # left padding: the last position is every row's last token
                ids[r, length - len(p):] = torch.as_tensor(p)
                mask[r, length - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            offsets = torch.zeros(model.num_tasks + 1, dtype=torch.long)
            offsets[TASK_IDS["topk"] + 1:] = b  # every row in the topk task's segment
            model.segments.set(offsets.to(device))
            embeds = model.embed_with_soft_tokens(
                ids, torch.ones(b, dtype=torch.long, device=device),
                torch.full((b,), -1, dtype=torch.long, device=device),  # -1: the fallback user row
                torch.full((b, 1), -1, dtype=torch.long, device=device),  # no history
                torch.as_tensor(items, dtype=torch.long, device=device)[:, None],
                torch.ones(b, dtype=torch.bool, device=device))
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            hidden = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                             position_ids=pos).last_hidden_state  # [b, L, hidden]
            out.append(hidden[:, -1].float())
    finally:
        model.train(was_training)
    local = torch.cat(out)[:per_rank]  # [<= per_rank, hidden]
    if world > 1:
        full = torch.zeros((per_rank, local.shape[1]), dtype=local.dtype, device=local.device)
        count = len(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
        full[:count] = local[:count]
        parts = [torch.empty_like(full) for _ in range(world)]
        dist.all_gather(parts, full)
        local = torch.cat(parts)[:n]
    return local.cpu().numpy().astype(np.float32)


def export_item_representations(model, out_dir: str, cfg: Config, tokenizer, state: dict, write: bool,
                                progress: Callable[[str], None] = print) -> Optional[np.ndarray]:
    """Computes ``item_representations`` over the data set's items (all ranks: a collective under ZeRO-3) and,
    when ``write``, saves ``item_repr.npy`` + ``item_repr.json`` into the (local) adapter folder ``out_dir``."""
    import time

    t0 = time.perf_counter()
    titles = item_titles(cfg)
    reps = item_representations(model, tokenizer, titles, cfg.cf.mutual_batch_size)
    if not write:
        return reps
    from ckf_dist.cf.binding import data_manifest_hash
    from ckf_dist.data.streaming import read_manifest

    try:
        manifest_sha = data_manifest_hash(read_manifest(cfg))
    except FileNotFoundError:
        manifest_sha = None
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, REPR_FILE), reps)
    meta = {"cf_version": state.get("cf_version"), "step": state.get("step"), "num_items": int(reps.shape[0]),
            "hidden": int(reps.shape[1]), "data_manifest_sha256": manifest_sha,
            "prompt": ITEM_PROMPT, "task": "topk", "seconds": round(time.perf_counter() - t0, 3),
            "how": "decoder final hidden state at the last prompt position; user slot = the fallback row, item "
                   "slot = the item's soft token; topk task LoRA; eval mode"}
    with open(os.path.join(out_dir, REPR_META), "w") as f:
        json.dump(meta, f, indent=2)
    progress(f"item representations [{reps.shape[0]}, {reps.shape[1]}] written to {out_dir} "
             f"({meta['seconds']:.1f}s)")
    return reps


# -------------------------------------------------------------------------------------------- CF side
@dataclass
class ItemReps:
    """Representations read back: reps float32 [num_items, hidden]; source: the adapter folder; meta: its json."""

    reps: np.ndarray
    source: str
    meta: dict


def _candidates(fs, root: str) -> list[str]:
    """Adapter folders of a run folder that hold representations: ``adapter`` then ``checkpoint_*/adapter``."""
    import pyarrow.fs as pafs

    found = []
    if io.exists(fs, io.join(root, "adapter", REPR_FILE)):
        found.append(io.join(root, "adapter"))
    info = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    for d in sorted(f.path for f in info if f.type == pafs.FileType.Directory):
        if d.rsplit("/", 1)[-1].startswith("checkpoint_") and io.exists(fs, io.join(d, "adapter", REPR_FILE)):
            found.append(io.join(d, "adapter"))
    return found


def find_source(cfg: Config) -> str:
    """The adapter folder to read (local path or s3:// URI). ``cf.mutual_source`` may name an adapter folder
    (it holds item_repr.npy) or a run folder; "" = ``checkpoint.storage_path/checkpoint.run_name``. In a run
    folder the export with the highest step wins (the published ``adapter`` on a tie: it is the final one).
    FileNotFoundError naming the searched place when there is none."""
    given = cfg.cf.mutual_source or io.join(cfg.checkpoint.storage_path, cfg.checkpoint.run_name)
    s3 = cfg.data.s3
    fs, root = io.get_filesystem(given, s3)
    if io.exists(fs, io.join(root, REPR_FILE)):
        return given
    best, best_key = None, None
    for folder in _candidates(fs, root):
        step = io.read_json(fs, io.join(folder, REPR_META)).get("step") or 0
        key = (int(step), folder.endswith("/adapter") and "/checkpoint_" not in folder)
        if best_key is None or key > best_key:
            best, best_key = folder, key
    if best is None:
        key = "cf.mutual_source" if cfg.cf.mutual_source else "checkpoint.storage_path/checkpoint.run_name"
        raise FileNotFoundError(
            f"cf.mutual=true: no {REPR_FILE} under {given} ({key}; looked in the folder itself, adapter/ and "
            f"checkpoint_*/adapter/). Train with cf.mutual=true (the adapter export then writes it) or point "
            f"cf.mutual_source at an adapter folder that has one")
    if io.is_s3(given):
        return "s3://" + best
    return best


def load_item_representations(source: str, num_items: int, s3: Optional[S3Config] = None,
                              data_manifest_sha256: Optional[str] = None) -> ItemReps:
    """Reads ``<source>/item_repr.npy`` (+ json). ValueError naming the file when its rows are not
    ``num_items``, when it is not a finite 2-d array, or when it was computed on another data set (both
    manifest hashes known and different: its rows would name other items)."""
    import io as pyio

    fs, root = io.get_filesystem(source, s3)
    path, meta_path = io.join(root, REPR_FILE), io.join(root, REPR_META)
    if not io.exists(fs, path):
        raise FileNotFoundError(f"cf.mutual: no {REPR_FILE} in {source}")
    reps = np.load(pyio.BytesIO(io.read_bytes(fs, path, display=f"{source}/{REPR_FILE}")), allow_pickle=False)
    meta = io.read_json(fs, meta_path) if io.exists(fs, meta_path) else {}
    where = f"{source}/{REPR_FILE}"
    if reps.ndim != 2 or not np.isfinite(reps).all():
        raise ValueError(f"{where}: expected a finite [num_items, hidden] array, got shape {reps.shape}")
    if reps.shape[0] != num_items:
        raise ValueError(f"{where} has {reps.shape[0]} item rows but the data set has {num_items} items: it was "
                         f"exported for another data set; retrain the adapter or set cf.mutual_source")
    theirs = meta.get("data_manifest_sha256")
    if theirs and data_manifest_sha256 and theirs != data_manifest_sha256:
        raise ValueError(f"{where} was computed on another data set (manifest sha256 {theirs[:12]}..., this one "
                         f"{data_manifest_sha256[:12]}...): its rows may name other items; retrain the adapter "
                         f"on this data set or set cf.mutual_source")
    return ItemReps(reps.astype(np.float32), source, meta)


def ridge_map(reps: torch.Tensor, vectors: torch.Tensor, ridge: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares from LLM representations to CF vectors, with intercept.

    reps R [n, h], vectors E [n, d] (the rows to fit on). Solves
    ``min_W ||(R - r) W - (E - e)||^2 + lam ||W||^2`` with r, e the column means and
    ``lam = ridge * ||R - r||_F^2 / h`` (the mean eigenvalue of the centred R^T R, so ``ridge`` is scale-free).
    Returns (W [h, d], b [d]) with fitted values ``R W + b``. Uses the h x h normal equations when h <= n, the
    n x n dual (W = R^T (R R^T + lam I)^-1 E) otherwise; float64 inside.
    """
    r = reps.double()
    e = vectors.double()
    r_mean, e_mean = r.mean(0), e.mean(0)
    rc, ec = r - r_mean, e - e_mean
    n, h = rc.shape
    lam = ridge * float((rc * rc).sum()) / h
    lam = max(lam, 1e-12)
    if h <= n:
        w = torch.linalg.solve(rc.T @ rc + lam * torch.eye(h, dtype=rc.dtype), rc.T @ ec)
    else:
        w = rc.T @ torch.linalg.solve(rc @ rc.T + lam * torch.eye(n, dtype=rc.dtype), ec)
    b = e_mean - r_mean @ w
    return w.float(), b.float()


def mutual_targets(reps: torch.Tensor, item_vectors: torch.Tensor, fit_items: torch.Tensor,
                   train_users: torch.Tensor, train_items: torch.Tensor, num_users: int,
                   ridge: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(item targets [I, d], user targets [U, d]) for one epoch.

    reps [I, h]; item_vectors [I, d] (the current CF item table, detached); fit_items [m]: the item ids the map
    is fitted on (those with training data or a warm-started row; the others are untrained noise). The item
    target is ``R W + b`` for every item; a user's target is the mean target of its train pairs
    (train_users [E], train_items [E]); users without train pairs get 0 (they are never in a batch).
    """
    w, b = ridge_map(reps[fit_items], item_vectors[fit_items], ridge)
    t_items = reps @ w + b  # [I, d]
    d = t_items.shape[1]
    sums = torch.zeros((num_users, d), dtype=t_items.dtype).index_add_(0, train_users, t_items[train_items])
    counts = torch.bincount(train_users, minlength=num_users).clamp_min(1).to(t_items.dtype)
    return t_items, sums / counts[:, None]


def mutual_loss(user_vecs: torch.Tensor, item_vecs: torch.Tensor, user_targets: torch.Tensor,
                item_targets: torch.Tensor) -> torch.Tensor:
    """mean_b ||item_vecs[b] - item_targets[b]||^2 + mean_b ||user_vecs[b] - user_targets[b]||^2 (all [B, d]);
    the caller weights it by ``cf.mutual_weight``."""
    return ((item_vecs - item_targets).pow(2).sum(-1).mean()
            + (user_vecs - user_targets).pow(2).sum(-1).mean())
