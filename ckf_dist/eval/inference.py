"""Batch inference for the evaluation: a callable class for ``ray.data.Dataset.map_batches``.

``CKFScorer`` builds the CKF model once per actor (tokenizer and adapter files shipped from the driver, CF
tables of the adapter's version read from the embedding store, ``load_adapter``), then turns each batch of raw
prompt rows (``schema.PROMPTS_SCHEMA``) into one output row per sample (``OUT_SCHEMA``):

* ctr / rating: one forward pass over prompt + true answer (``collate_prompts``): p(Yes) and the expected
  rating from the logits at the answer token where the alternatives first differ (``batch["score_pos"]``:
  0 for a byte-level BPE, 1 for a LLaMA sentencepiece digit "▁", "4"; ``scoring.score_rows``), the answer loss;
* topk: each sample becomes K rows (same prompt, candidate title + eos as the answer); the candidate's score
  is the mean (or sum, ``eval.topk_score``) log-probability of those answer tokens;
* rating (+ review_rating) / explanation: greedy decoding (KV cache, left padding) of the answer: ``generated``.

Prompts (all three kinds) start with the tokenizer's own leading special tokens (BOS for LLaMA-family
tokenizers, none for the tiny BPE: ``streaming.tokenize_batch``); answers and candidate titles never do.

``CFScorer`` gives the CF-only baseline the same interface and output.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from ckf_dist.data.schema import TASK_IDS
from ckf_dist.eval.metrics import catalogue_rank_range

OUT_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("task_id", pa.int8()), ("user_id", pa.int64()), ("is_cold", pa.bool_()),
    ("label", pa.float32()),
    ("p_yes", pa.float32()),  # ctr: p(Yes) (CF-only: calibrated sigmoid of u.v)
    ("score", pa.float32()),  # ctr: ranking score (p_yes, or u.v); rating: expected rating
    ("loss", pa.float32()),  # mean answer-token CE of the true answer (null for the CF baseline)
    ("topk_scores", pa.list_(pa.float32())),  # topk: one score per candidate, in candidate order
    ("generated", pa.string()),  # rating / explanation: greedy-decoded answer
    ("reference", pa.string()),  # the true answer text
    # next_item: (g, e) = items scoring above / tying with the true item over the whole catalogue, history items
    # excluded (eval.metrics.catalogue_rank_range); with the top-K row's candidates, their scores are topk_scores
    # and the true item's index among them candidate_pos
    ("catalogue_rank", pa.list_(pa.int64())),
    ("candidate_pos", pa.int64()),
])

RATING_MAX_NEW_TOKENS = 8
# rating-like tasks (answer "1".."5"): rating, and review_rating (review -> rating) where the schema has it
RATING_TASK_IDS = tuple(TASK_IDS[t] for t in ("rating", "review_rating") if t in TASK_IDS)
_GEN_TASKS = RATING_TASK_IDS + (TASK_IDS["explanation"],)
NEXT_ITEM = TASK_IDS["next_item"]


def _base_columns(batch: pa.Table) -> dict:
    """Output columns for a scored batch: the row identity and reference answer filled, scores empty."""
    cols = _empty_columns(batch.num_rows)
    for key in ("sample_id", "task_id", "user_id", "is_cold", "label"):
        cols[key] = batch.column(key).to_pylist()
    cols["reference"] = batch.column("answer").to_pylist()
    return cols


def _empty_columns(n: int) -> dict:
    return {name: [None] * n for name in OUT_SCHEMA.names}


def _to_table(cols: dict) -> pa.Table:
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in OUT_SCHEMA}, schema=OUT_SCHEMA)


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], task_id: int, is_hybrid: bool, user_ids, history, targets,
                    pad_id: int, eos_id: int, max_new_tokens: int, device) -> list[list[int]]:
    """Greedy decoding for rows of one task: left-padded prompts, soft tokens injected into the prompt
    embeddings, then one token at a time with the KV cache. Returns the new token ids of each row, up to (not
    including) eos."""
    b = len(prompts)
    length = max(len(p) for p in prompts)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, length - len(p):] = 1

    def pad(lists):
        width = max((len(x) for x in lists), default=0) or 1
        out = torch.full((b, width), -1, dtype=torch.long)
        for i, x in enumerate(lists):
            out[i, :len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        return out

    ids, mask = ids.to(device), mask.to(device)
    offsets = torch.zeros(model.num_tasks + 1, dtype=torch.long)
    offsets[task_id + 1:] = b
    model.segments.set(offsets.to(device))
    embeds = model.embed_with_soft_tokens(
        ids, torch.as_tensor([len(t) for t in targets], dtype=torch.long, device=device),
        torch.as_tensor(np.asarray(user_ids, dtype=np.int64), device=device), pad(history).to(device),
        pad(targets).to(device), torch.full((b,), bool(is_hybrid), device=device))
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    nxt = out.logits[:, -1].float().argmax(-1)
    generated = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    last = pos[:, -1:]
    for step in range(max_new_tokens):
        done |= nxt == eos_id
        for i in (~done).nonzero().flatten().tolist():
            generated[i].append(int(nxt[i]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        last = last + 1
        out = model.llm(input_ids=nxt[:, None], attention_mask=mask, position_ids=last,
                        past_key_values=out.past_key_values, use_cache=True)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), out.logits[:, -1].float().argmax(-1))
    return generated


class CKFScorer:
    """Ray Data callable class: raw prompt rows (pyarrow) -> ``OUT_SCHEMA`` rows. One model per actor."""

    def __init__(self, config: dict, tokenizer, adapter_files: dict[str, bytes], cf_version: Optional[str],
                 use_gpu: bool):
        from ckf_dist.checkpoint import load_adapter
        from ckf_dist.config import from_dict
        from ckf_dist.worker import build_ckf_model, load_cf_tables, model_dtype

        self.cfg = from_dict(config)
        self.tokenizer = tokenizer
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        from ckf_dist.data.streaming import read_manifest

        _, users, items = load_cf_tables(self.cfg, cf_version, read_manifest(self.cfg))
        self.model = build_ckf_model(self.cfg, tokenizer, users, items, dtype=model_dtype(self.cfg, self.device.type == "cuda"))
        with tempfile.TemporaryDirectory(prefix="ckf_eval_adapter_") as tmp:
            for name, data in adapter_files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            load_adapter(self.model, tmp)
        self.model.to(self.device).eval()
        self.form = self.cfg.eval.form
        self.titles = _item_titles(self.cfg)
        from ckf_dist import scoring

        self.answer_ids = scoring.answer_token_ids(tokenizer)

    # ------------------------------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        from ckf_dist.data.streaming import tokenize_batch

        cols = _base_columns(batch)
        tok = tokenize_batch(batch, self.tokenizer, self.cfg.data.max_seq_len).to_pydict()
        task = np.asarray(cols["task_id"])
        for t in (TASK_IDS["ctr"],) + RATING_TASK_IDS:
            rows = np.flatnonzero(task == t)
            for chunk in _chunks(rows, self.cfg.eval.batch_size):
                self._score_answers(tok, chunk, cols)
        rows = np.flatnonzero(task == TASK_IDS["topk"])
        per = max(1, self.cfg.eval.batch_size // max(1, self.cfg.data.num_candidates))
        for chunk in _chunks(rows, per):
            self._score_candidates(tok, chunk, cols)
        for t in _GEN_TASKS:
            rows = np.flatnonzero(task == t)
            for chunk in _chunks(rows, self.cfg.eval.batch_size):
                self._generate(tok, chunk, t, cols)
        rows = np.flatnonzero(task == NEXT_ITEM)
        for chunk in _chunks(rows, self.cfg.eval.batch_size):
            self._rank_catalogue(tok, chunk, cols, batch)
        return _to_table(cols)

    @torch.no_grad()
    def _rank_catalogue(self, tok: dict, rows, cols: dict, batch: pa.Table) -> None:
        """next_item rows: the item head's scores over the whole catalogue -> the true item's rank range (history
        excluded) and, where the row carries the top-K row's candidates, their scores."""
        batch_t, out = self._forward(self._sub(tok, rows))
        if "item_logits" not in out:
            raise ValueError("next_item rows need a model trained with the next_item task (its item head is on only "
                             f"with next_item in data.tasks; the adapter's data.tasks: {list(self.cfg.data.tasks)})")
        src = batch_t["sample_index"].cpu().numpy()
        logits = out["item_logits"].cpu().numpy()
        for j, sample in enumerate(out["next_item_rows"].cpu().numpy()):
            i = int(np.asarray(rows)[src[sample]])
            cols["catalogue_rank"][i] = list(catalogue_rank_range(logits[j], int(cols["label"][i]),
                                                                  tok["history_item_ids"][i]))
            cols["loss"][i] = float(out["row_loss"][sample])
            _candidate_scores(cols, batch, i, logits[j])

    def _sub(self, tok: dict, rows, answers=None, repeat: int = 1) -> dict:
        idx = np.repeat(np.asarray(rows), repeat)
        out = {k: _obj([tok[k][i] for i in idx]) for k in ("text_prompt_ids", "hybrid_prompt_ids", "history_item_ids",
                                                           "target_item_ids")}
        out["answer_ids"] = _obj(answers if answers is not None else [tok["answer_ids"][i] for i in idx])
        for k in ("task_id", "user_id", "label"):
            out[k] = np.asarray([tok[k][i] for i in idx])
        return out

    def _forward(self, sub: dict) -> tuple[dict, dict]:
        from ckf_dist import scoring
        from ckf_dist.data.collate import collate_prompts, to_device

        batch = collate_prompts(sub, self.tokenizer.pad_token_id, len(TASK_IDS), forms=(self.form,))
        # the answer token where Yes/No or "1".."5" first differ (1 for a sentencepiece digit "▁", "4")
        batch["score_pos"] = scoring.score_positions(batch["task_ids"], self.answer_ids)
        batch = to_device(batch, self.device)
        return batch, self.model(batch, text_weight=0.0 if self.form == "hybrid" else 1.0)

    @torch.no_grad()
    def _score_answers(self, tok: dict, rows, cols: dict) -> None:
        from ckf_dist import scoring

        batch, out = self._forward(self._sub(tok, rows))
        s = scoring.score_rows(out["answer_logits"], batch, out["row_loss"], self.answer_ids)
        src = np.asarray(rows)[batch["sample_index"].cpu().numpy()]
        for j, i in enumerate(src):
            if cols["task_id"][i] == TASK_IDS["ctr"]:
                cols["p_yes"][i] = cols["score"][i] = float(s["p_yes"][j])
            else:
                cols["score"][i] = float(s["rating_pred"][j])
            cols["loss"][i] = float(s["loss"][j])

    @torch.no_grad()
    def _score_candidates(self, tok: dict, rows, cols: dict) -> None:
        k = self.cfg.data.num_candidates
        answers = []
        for i in rows:
            cands = tok["target_item_ids"][i]
            if len(cands) != k:
                raise ValueError(f"sample {cols['sample_id'][i]!r}: {len(cands)} candidates, data.num_candidates={k}")
            titles = [self.titles[c] for c in cands]
            enc = self.tokenizer(titles, add_special_tokens=False)["input_ids"]
            answers.extend(e + [self.tokenizer.eos_token_id] for e in enc)
        sub = self._sub(tok, rows, answers=answers, repeat=k)
        batch, out = self._forward(sub)
        n_tok = (batch["labels"][:, 1:] != -100).sum(1).clamp_min(1).float()
        mean_lp = (-out["row_loss"].float()).cpu().numpy()
        sum_lp = (-out["row_loss"].float() * n_tok).cpu().numpy()
        score = mean_lp if self.cfg.eval.topk_score == "mean" else sum_lp
        src = batch["sample_index"].cpu().numpy()  # position in the repeated list: sample r*k + candidate
        per_row = np.empty(len(src), dtype=np.float64)
        per_row[src] = score
        for r, i in enumerate(rows):
            cols["topk_scores"][i] = per_row[r * k:(r + 1) * k].tolist()
            pos = int(cols["label"][i])
            cols["loss"][i] = float(-mean_lp[np.flatnonzero(src == r * k + pos)[0]])

    @torch.no_grad()
    def _generate(self, tok: dict, rows, task_id: int, cols: dict) -> None:
        key = f"{self.form}_prompt_ids"
        max_new = self.cfg.eval.max_new_tokens
        if task_id in RATING_TASK_IDS:
            max_new = min(max_new, RATING_MAX_NEW_TOKENS)
        new = greedy_generate(self.model, [list(tok[key][i]) for i in rows], task_id, self.form == "hybrid",
                              [tok["user_id"][i] for i in rows], [tok["history_item_ids"][i] for i in rows],
                              [tok["target_item_ids"][i] for i in rows], self.tokenizer.pad_token_id,
                              self.tokenizer.eos_token_id, max_new, self.device)
        for i, ids in zip(rows, new):
            cols["generated"][i] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class CFScorer:
    """The CF-only baseline with CKFScorer's interface: s = u.v of the CF tables (fallback rows for unknown ids).

    ctr: score = s, p_yes = sigmoid(a s + b) (Platt scaling fitted on the train split's CTR rows);
    topk: candidate scores s; rating: score = clip(c s + d, 1, 5) (least squares on train interactions with a
    rating), also written as ``generated`` so the rating metrics need no special case. Explanation: none.
    """

    def __init__(self, user_table: np.ndarray, item_table: np.ndarray, ctr_fit: tuple[float, float],
                 rating_fit: tuple[float, float]):
        self.users, self.items = user_table, item_table
        self.ctr_fit, self.rating_fit = ctr_fit, rating_fit

    def dot(self, users, items) -> np.ndarray:
        return cf_dot(self.users, self.items, np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64))

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols = _base_columns(batch)
        targets = batch.column("target_item_ids").to_pylist()
        histories = batch.column("history_item_ids").to_pylist() if NEXT_ITEM in cols["task_id"] else None
        for i in range(n):
            t, u = cols["task_id"][i], cols["user_id"][i]
            if t == NEXT_ITEM:  # u.v of every catalogue item (the fallback row excluded)
                dots = self.dot([u] * (self.items.shape[0] - 1), np.arange(self.items.shape[0] - 1))
                cols["catalogue_rank"][i] = list(catalogue_rank_range(dots, int(cols["label"][i]), histories[i]))
                _candidate_scores(cols, batch, i, dots)
                continue
            s = self.dot([u] * len(targets[i]), targets[i])
            if t == TASK_IDS["ctr"]:
                a, b = self.ctr_fit
                cols["score"][i] = float(s[0])
                cols["p_yes"][i] = float(1.0 / (1.0 + np.exp(-(a * s[0] + b))))
            elif t == TASK_IDS["topk"]:
                cols["topk_scores"][i] = s.tolist()
            elif t in RATING_TASK_IDS:
                c, d = self.rating_fit
                r = float(np.clip(c * s[0] + d, 1.0, 5.0))
                cols["score"][i] = r
                cols["generated"][i] = f"{r:.6f}"
        return _to_table(cols)


def cf_dot(user_table: np.ndarray, item_table: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """u.v with dense tables [n+1, d] whose last row is the fallback for ids outside the table."""
    fu, fi = user_table.shape[0] - 1, item_table.shape[0] - 1
    u = np.where((users >= 0) & (users < fu), users, fu)
    v = np.where((items >= 0) & (items < fi), items, fi)
    return np.einsum("nd,nd->n", user_table[u], item_table[v]).astype(np.float64)


def _candidate_scores(cols: dict, batch: pa.Table, i: int, scores: np.ndarray) -> None:
    """A next_item row with the top-K row's candidates (``evaluate.attach_candidates``): their catalogue scores
    (``topk_scores``) and the true item's index among them (``candidate_pos``)."""
    if "candidate_item_ids" not in batch.column_names:
        return
    cands = batch.column("candidate_item_ids")[i].as_py()
    if not cands:
        return
    label = int(cols["label"][i])
    if label not in cands:
        raise ValueError(f"sample {cols['sample_id'][i]!r}: its item {label} is not among the top-K row's "
                         f"candidates {cands}")
    cols["topk_scores"][i] = [float(scores[c]) if 0 <= c < len(scores) else float("-inf") for c in cands]
    cols["candidate_pos"][i] = cands.index(label)


def _item_titles(cfg) -> dict[int, str]:
    import pyarrow.parquet as pq

    from ckf_dist.config import resolve_data_path
    from ckf_dist.data import io

    fs, p = io.get_filesystem(resolve_data_path(cfg), cfg.data.s3)
    t = pq.read_table(io.join(p, "items"), filesystem=fs, columns=["item_id", "title"])
    return dict(zip(t.column("item_id").to_pylist(), t.column("title").to_pylist()))


def _chunks(rows: np.ndarray, size: int):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _obj(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = np.asarray(v)
    return out
