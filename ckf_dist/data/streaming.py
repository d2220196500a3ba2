"""Ray Data pipelines over prepared prompt shards: read parquet (local or S3), tokenise in ``map_batches``.

Training workers take their part with ``ray.train.get_dataset_shard`` and iterate it with
``iter_torch_batches(collate_fn=...)`` so that padding, task sorting and offsets run in Ray's prefetch thread.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.config import Config, resolve_data_path
from ckf_dist.data import io
from ckf_dist.data.schema import MANIFEST, PLACEHOLDER, expected_placeholders

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ["sample_id", "task_id", "user_id", "is_cold", "history_item_ids", "target_item_ids", "label",
                  "prompt_text", "prompt_hybrid", "answer"]
TOKENISED_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("task_id", pa.int8()), ("user_id", pa.int64()), ("is_cold", pa.bool_()),
    ("label", pa.float32()), ("history_item_ids", pa.list_(pa.int64())), ("target_item_ids", pa.list_(pa.int64())),
    ("text_prompt_ids", pa.list_(pa.int32())), ("hybrid_prompt_ids", pa.list_(pa.int32())),
    ("answer_ids", pa.list_(pa.int32())), ("truncated", pa.bool_()),
])

TOKENISED_BLOCK_BYTES = 8 * 1024 * 1024


def prompt_prefix_ids(tokenizer) -> list[int]:
    """The special tokens ``tokenizer(text)`` puts before a text with its default special tokens: [bos] for
    LLaMA-family tokenizers, [] for a tokenizer without a post-processor (the tiny byte-level BPE, SmolLM2's
    GPT-2-style one). Prompts start with them, as the pretrained model expects; answers never do."""
    probe = "The user"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    special = set(tokenizer.all_special_ids)  # the text itself tokenised differently: its leading specials
    n = 0
    while n < len(full) and full[n] in special:
        n += 1
    return full[:n]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _fit(prompt: list[int], answer_len: int, max_len: int, head: int) -> tuple[list[int], bool]:
    """Cuts history tokens just after the first ``head`` tokens so prompt + answer fit in ``max_len``.

    The answer is never cut; the head holds the prompt's leading special tokens (BOS) and the intro up to the
    user's placeholder, target placeholders come after the history, so a cut that reaches them is caught by
    the placeholder check that follows.
    """
    excess = len(prompt) + answer_len - max_len
    if excess <= 0:
        return prompt, False
    return prompt[:head] + prompt[head + excess:], True


def tokenize_batch(batch: pa.Table, tokenizer, max_seq_len: int) -> pa.Table:
    """Prompt rows (PROMPTS_SCHEMA columns) -> token ids for both forms (after the tokenizer's own leading
    special tokens, ``prompt_prefix_ids``) and the answer (+ eos, no leading special token)."""
    if batch.num_rows == 0:  # a Ray batch holding none of data.tasks: the tokenizer cannot take an empty list
        return TOKENISED_SCHEMA.empty_table()
    cols = batch.to_pydict()
    ph_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    prefix = prompt_prefix_ids(tokenizer)
    text_ids = [prefix + ids for ids in tokenizer(cols["prompt_text"], add_special_tokens=False)["input_ids"]]
    hyb_ids = [prefix + ids for ids in tokenizer(cols["prompt_hybrid"], add_special_tokens=False)["input_ids"]]
    ans_ids = [ids + [tokenizer.eos_token_id] for ids in tokenizer(cols["answer"], add_special_tokens=False)["input_ids"]]
    out_text, out_hyb, truncated = [], [], []
    for i, sid in enumerate(cols["sample_id"]):
        hyb, txt = hyb_ids[i], text_ids[i]
        # head: BOS + "The user" (+ the user's placeholder in the hybrid form); the text form's head is the part
        # it shares with the hybrid one before that placeholder
        user_ph = hyb.index(ph_id, len(prefix)) if ph_id in hyb else None
        head_h = len(prefix) if user_ph is None else user_ph + 1
        head_t = max(len(prefix), _common_prefix(txt, hyb[:user_ph]) if user_ph is not None else 0)
        hyb, cut_h = _fit(hyb, len(ans_ids[i]), max_seq_len, head_h)
        txt, cut_t = _fit(txt, len(ans_ids[i]), max_seq_len, head_t)
        want = expected_placeholders(len(cols["target_item_ids"][i]))
        got = hyb.count(ph_id)
        if got != want:
            hint = " after cutting it to data.max_seq_len (raise it)" if cut_h else ""
            raise ValueError(f"sample {sid!r}: hybrid prompt has {got} {PLACEHOLDER} tokens{hint}, expected {want}")
        if ph_id in txt:
            raise ValueError(f"sample {sid!r}: text-only prompt contains {PLACEHOLDER}")
        out_text.append(txt)
        out_hyb.append(hyb)
        truncated.append(cut_h or cut_t)
    return pa.table({
        "sample_id": cols["sample_id"], "task_id": pa.array(cols["task_id"], pa.int8()),
        "user_id": pa.array(cols["user_id"], pa.int64()), "is_cold": pa.array(cols["is_cold"], pa.bool_()),
        "label": pa.array(cols["label"], pa.float32()),
        "history_item_ids": pa.array(cols["history_item_ids"], pa.list_(pa.int64())),
        "target_item_ids": pa.array(cols["target_item_ids"], pa.list_(pa.int64())),
        "text_prompt_ids": pa.array(out_text, pa.list_(pa.int32())),
        "hybrid_prompt_ids": pa.array(out_hyb, pa.list_(pa.int32())),
        "answer_ids": pa.array(ans_ids, pa.list_(pa.int32())),
        "truncated": pa.array(truncated, pa.bool_()),
    }, schema=TOKENISED_SCHEMA)


def read_manifest(cfg: Config, path: Optional[str] = None) -> dict:
    root = path or resolve_data_path(cfg)
    fs, p = io.get_filesystem(root, cfg.data.s3)
    mpath = io.join(p, MANIFEST)
    if not io.exists(fs, mpath):
        raise FileNotFoundError(f"no prepared data set at {root} ({MANIFEST} missing): run "
                                f"python -m ckf_dist.data.prepare data.path={root}")
    return io.read_json(fs, mpath)


def prompt_dataset(cfg: Config, split: str, tokenizer, limit: int = 0, path: Optional[str] = None):
    """A lazy Ray Dataset of tokenised prompt rows of one split (tasks filtered to ``data.tasks``)."""
    import ray.data

    root = path or resolve_data_path(cfg)
    fs, p = io.get_filesystem(root, cfg.data.s3)
    ds = ray.data.read_parquet(io.join(p, "prompts", split), filesystem=fs, columns=PROMPT_COLUMNS)
    wanted = set(cfg.data.tasks)
    ds = ds.map_batches(functools.partial(_filter_and_tokenize, tokenizer=tokenizer, max_seq_len=cfg.data.max_seq_len,
                                          wanted=sorted(wanted)), batch_format="pyarrow", batch_size=256)
    # A map task hands its output on in blocks of target_max_block_size (Ray's default 128 MiB, ~30k rows
    # of tokenised 20-candidate prompts): the first batch would wait for a whole one (92 s to the first
    # batch on ML-100K with SmolLM2's tokenizer on 2 CPUs; 20 s with 8 MiB blocks, ~10 s of it Ray Data
    # start-up). The setting travels with this dataset's own context, not the process-wide one.
    ds.context.target_max_block_size = TOKENISED_BLOCK_BYTES
    if limit:
        ds = ds.limit(limit)
    return ds


def _filter_and_tokenize(batch: pa.Table, tokenizer, max_seq_len: int, wanted: list[str]) -> pa.Table:
    from ckf_dist.data.schema import TASK_IDS

    keep = np.isin(batch.column("task_id").to_numpy(zero_copy_only=False), [TASK_IDS[t] for t in wanted])
    if not keep.all():
        batch = batch.filter(pa.array(keep))
    return tokenize_batch(batch, tokenizer, max_seq_len)


def tokenizer_corpus(cfg: Config, max_rows: int = 4000, path: Optional[str] = None) -> list[str]:
    """Texts to train the tiny model's BPE on: all item titles + a slice of every train prompt shard's prompts
    and answers (read in a fixed order so every process gets the same tokenizer)."""
    root = path or resolve_data_path(cfg)
    fs, p = io.get_filesystem(root, cfg.data.s3)
    texts: list[str] = []
    items = pq.read_table(io.join(p, "items"), filesystem=fs, columns=["title"])
    texts.extend(items.column("title").to_pylist())
    files = io.list_files(fs, io.join(p, "prompts", "train"), ".parquet")
    if not files:
        raise FileNotFoundError(f"no train prompt shards under {root}/prompts/train")
    per_file = max(1, max_rows // len(files))
    for f in files:  # a slice of every shard: shards may be grouped by task
        rows = pq.read_table(f, filesystem=fs, columns=["prompt_text", "answer"]).slice(0, per_file)
        texts.extend(rows.column("prompt_text").to_pylist())
        texts.extend(rows.column("answer").to_pylist())
    return texts
