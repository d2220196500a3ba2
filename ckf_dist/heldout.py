"""Held-out evaluation inside a training run: does the CF knowledge help, and is it the CF content that helps?

Before and after training, every rank scores its part of the held-out rows (``training.eval_splits``, by
default valid + test; at most ``training.eval_rows`` rows per task) with the model as it stands, in three
forms, and the CF-only baseline on the same rows:

* ``hybrid``: the prompts with soft tokens (the CKF model);
* ``text``: the same prompts without soft tokens (the same adapters; only the prompt form differs);
* ``hybrid_cf_permuted``: the hybrid prompts with the rows of both CF tables randomly permuted (a fixed
  permutation, the fallback row kept): every user and item still gets a fixed, real CF vector, just not its
  own. The gap hybrid - permuted is the effect of the CF *content* (a hybrid - text gap alone could come from
  the prompt form, e.g. the soft tokens acting as learned constant tokens);
* ``cf_only``: u.v of the CF tables (ctr: AUC; top-K: HR@1 over the candidates).

Scores: CTR p(Yes) and the expected rating from the answer-position logits (``ckf_dist.scoring``); top-K by
the mean log-probability of each candidate's title tokens + eos given the prompt (one row per candidate,
never generated); every task's answer loss. ``summarize_heldout`` turns the gathered rows into metrics and a
paired bootstrap (``scipy.stats.bootstrap``, 1,000 resamples of rows) 95% interval of the CF effect on CTR AUC.

Under ZeRO-3 each forward pass is a collective (parameters are gathered per layer), so every rank runs the
same number of forward passes: ranks agree on the number of chunks (all-reduce MAX) and a rank with fewer
rows repeats its last chunk and drops the repeat's scores.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ckf_dist import scoring
from ckf_dist.config import Config, resolve_data_path
from ckf_dist.data import io
from ckf_dist.data.collate import collate_prompts, to_device
from ckf_dist.data.schema import TASK_IDS
from ckf_dist.eval import metrics as M

FORMS = ("hybrid", "text", "hybrid_cf_permuted")
TOPK = TASK_IDS["topk"]
NEXT_ITEM = TASK_IDS["next_item"]
CATALOGUE_KS = (10,)  # next_item: HR@k / NDCG@k over the whole catalogue
CTR = TASK_IDS["ctr"]
RATING_TASKS = tuple(TASK_IDS[t] for t in ("rating", "review_rating"))
PERMUTATION_SEED = 20261127
BOOTSTRAP_RESAMPLES = 1000


# ---------------------------------------------------------------------------------------------- driver
def heldout_table(cfg: Config, tokenizer) -> pa.Table:
    """Tokenised held-out rows (``streaming.TOKENISED_SCHEMA`` + ``candidate_answer_ids``): the first
    ``training.eval_rows`` rows of each task of ``data.tasks`` in the splits ``training.eval_splits`` (prompt
    shards are written in a seeded random order, so these are a random sample). ``candidate_answer_ids``:
    per top-K row, each candidate's title tokens + eos (empty for other tasks)."""
    from ckf_dist.data.streaming import PROMPT_COLUMNS, tokenize_batch

    fs, root = io.get_filesystem(resolve_data_path(cfg), cfg.data.s3)
    parts = []
    for split in cfg.training.eval_splits:
        for f in io.list_files(fs, io.join(root, "prompts", split), ".parquet"):
            parts.append(pq.read_table(f, filesystem=fs, columns=PROMPT_COLUMNS))
    table = pa.concat_tables(parts)
    keep = []
    task = table.column("task_id").to_numpy()
    for name in cfg.data.tasks:
        keep.extend(np.flatnonzero(task == TASK_IDS[name])[: cfg.training.eval_rows].tolist())
    table = table.take(pa.array(sorted(keep), pa.int64()))
    tok = tokenize_batch(table, tokenizer, cfg.data.max_seq_len)
    items = pq.read_table(io.join(root, "items"), filesystem=fs, columns=["item_id", "title"])
    title_ids = dict(zip(items.column("item_id").to_pylist(),
                         tokenizer(items.column("title").to_pylist(), add_special_tokens=False)["input_ids"]))
    eos = tokenizer.eos_token_id
    cands = [[title_ids[c] + [eos] for c in targets] if t == TOPK else []
             for t, targets in zip(tok.column("task_id").to_pylist(), tok.column("target_item_ids").to_pylist())]
    return tok.append_column("candidate_answer_ids", pa.array(cands, pa.list_(pa.list_(pa.int32()))))


# ---------------------------------------------------------------------------------------------- worker
def permutation_orders(user_rows: int, item_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row orders [n + 1] for tables of ``user_rows`` / ``item_rows`` rows: rows 0..n-1 permuted by a fixed seed,
    the fallback row n kept (``CKFModel.cf_permutation``)."""
    g = torch.Generator().manual_seed(PERMUTATION_SEED)
    return tuple(torch.cat([torch.randperm(rows - 1, generator=g), torch.tensor([rows - 1])])
                 for rows in (user_rows, item_rows))


def permuted_tables(users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CF tables [n + 1, d] with rows 0..n-1 permuted by a fixed seed (the fallback row n stays)."""
    orders = permutation_orders(users.shape[0], items.shape[0])
    return users[orders[0].to(users.device)], items[orders[1].to(items.device)]


def _expand(rows: dict, idx: np.ndarray) -> tuple[dict, list[tuple[int, int]]]:
    """Model rows for the samples ``idx``: one per non-top-K sample (its true answer), one per candidate of a
    top-K sample (that candidate's title as the answer). Returns (collate input, [(sample, candidate)])."""
    keys = ("text_prompt_ids", "hybrid_prompt_ids", "history_item_ids", "target_item_ids", "task_id", "user_id",
            "label")
    sub = {k: [] for k in keys + ("answer_ids",)}
    origin = []
    for i in idx:
        answers = rows["candidate_answer_ids"][i] if rows["task_id"][i] == TOPK else [rows["answer_ids"][i]]
        for c, ans in enumerate(answers):
            for k in keys:
                sub[k].append(rows[k][i])
            sub["answer_ids"].append(ans)
            origin.append((int(i), c))
    out = {}
    for k, v in sub.items():
        if k in ("task_id", "user_id", "label"):
            out[k] = np.asarray(v)
        else:
            arr = np.empty(len(v), dtype=object)
            arr[:] = [np.asarray(x, dtype=np.int64) for x in v]
            out[k] = arr
    return out, origin


@torch.no_grad()
def score_heldout(forward: Callable[[dict, bool], dict], model, rows: dict, tokenizer, pad_id: int, device,
                  chunk_size: int) -> dict[str, list]:
    """Per-sample scores of this rank's held-out ``rows`` (column lists of ``heldout_table``).

    ``forward(batch, hybrid)`` runs the (DeepSpeed-wrapped) model; ``model`` is the bare ``CKFModel`` whose CF
    tables are swapped for the permuted control. Returns column lists: task, label, is_cold, and per form
    ``loss/<form>``, ``p_yes/<form>``, ``rating/<form>``, ``topk/<form>`` (candidate scores), plus ``cf`` (u.v
    of the target; top-K: of every candidate).
    """
    import torch.distributed as dist

    n = len(rows["task_id"])
    ids = scoring.answer_token_ids(tokenizer)
    chunks = [np.arange(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]
    count = torch.tensor([len(chunks)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)  # every rank runs the same number of forward passes
    real = len(chunks)
    if not chunks and int(count.item()):
        raise RuntimeError("this rank has no held-out rows while another has some: cannot keep ZeRO-3 in step")
    chunks += [chunks[-1]] * (int(count.item()) - real)
    out: dict[str, list] = {"task": [], "label": [], "is_cold": [], "cf": []}
    for f in FORMS:
        for key in ("loss", "p_yes", "rating", "topk", "rank"):
            out[f"{key}/{f}"] = [None] * n
    users, items = model.user_table, model.item_table
    # the permuted-CF control reorders the rows the model reads (CF tables, or ID tokens with model.fusion=id_tokens)
    tables = (model.user_tokens, model.item_tokens) if model.fusion == "id_tokens" else (users, items)
    orders = permutation_orders(*(t.num_embeddings if isinstance(t, torch.nn.Embedding) else t.shape[0]
                                  for t in tables))
    for c, idx in enumerate(chunks):
        sub, origin = _expand(rows, idx)
        for form in FORMS:
            hybrid = form != "text"
            batch = collate_prompts(sub, pad_id, len(TASK_IDS), forms=("hybrid" if hybrid else "text",))
            batch["score_pos"] = scoring.score_positions(batch["task_ids"], ids)
            batch = to_device(batch, device)
            if form == "hybrid_cf_permuted":
                model.cf_permutation = orders
            try:
                res = forward(batch, hybrid)
            finally:
                model.cf_permutation = None
            if c >= real:
                continue  # a repeat that kept this rank in step with the others
            s = scoring.score_rows(res["answer_logits"], batch, res["row_loss"], ids)
            if "item_logits" in res:  # next_item rows: the item head's rank of the true item in the catalogue
                src = batch["sample_index"].cpu().numpy()
                for j, logits in zip(res["next_item_rows"].cpu().numpy(), res["item_logits"].cpu().numpy()):
                    i = origin[int(src[j])][0]
                    out[f"rank/{form}"][i] = M.catalogue_rank_range(logits, int(rows["label"][i]),
                                                                    rows["history_item_ids"][i])
            for j, src in enumerate(batch["sample_index"].cpu().numpy()):
                i, cand = origin[int(src)]
                if rows["task_id"][i] == TOPK:
                    if out[f"topk/{form}"][i] is None:
                        out[f"topk/{form}"][i] = [0.0] * len(rows["candidate_answer_ids"][i])
                    out[f"topk/{form}"][i][cand] = -float(s["loss"][j])  # mean log-prob of the title + eos
                    if cand == int(rows["label"][i]):
                        out[f"loss/{form}"][i] = float(s["loss"][j])
                else:
                    out[f"loss/{form}"][i] = float(s["loss"][j])
                    out[f"p_yes/{form}"][i] = float(s["p_yes"][j])
                    out[f"rating/{form}"][i] = float(s["rating_pred"][j])
        if c < real:
            for i in idx:
                targets = torch.as_tensor(np.asarray(rows["target_item_ids"][i], dtype=np.int64), device=users.device)
                if rows["task_id"][i] == NEXT_ITEM:  # CF-only: the rank of u.v over the whole catalogue
                    u = model._lookup(users, torch.tensor([int(rows["user_id"][i])], device=users.device))
                    dots = (items[:-1].float() @ u[0].float()).cpu().numpy()
                    out["cf"].append(list(M.catalogue_rank_range(dots, int(rows["label"][i]), rows["history_item_ids"][i])))
                else:
                    u = model._lookup(users, torch.full_like(targets, int(rows["user_id"][i])))
                    v = model._lookup(items, targets)
                    out["cf"].append((u.float() * v.float()).sum(-1).cpu().tolist())
                out["task"].append(int(rows["task_id"][i]))
                out["label"].append(float(rows["label"][i]))
                out["is_cold"].append(bool(rows["is_cold"][i]))
    return out


# ---------------------------------------------------------------------------------------------- metrics
def _auc(y: np.ndarray, s: np.ndarray) -> Optional[float]:
    return M.auc(y, s) if len(y) else None


def summarize_heldout(parts: list[dict[str, list]], bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Gathered ``score_heldout`` outputs -> a nested report::

        {"rows": {task: n}, "forms": {form: {"ctr/auc", "ctr/logloss", "topk/hr@1", "topk/ndcg@5",
         "rating/mae", "rating/rmse", "<task>/loss"}}, "cf_only": {"ctr/auc", "topk/hr@1"},
         "fusion": {"hybrid_minus_text_auc", "cf_effect_auc", "cf_effect_ci95": [lo, hi], "ctr_rows", ...}}
    """
    cols = {k: [v for p in parts for v in p[k]] for k in parts[0]} if parts else {}
    if not cols or not cols["task"]:
        return {}
    task = np.asarray(cols["task"])
    label = np.asarray(cols["label"], dtype=np.float64)
    names = {v: k for k, v in TASK_IDS.items()}
    report: dict = {"rows": {names[t]: int((task == t).sum()) for t in sorted(set(task.tolist()))}, "forms": {}}
    ctr, topk, nxt = np.flatnonzero(task == CTR), np.flatnonzero(task == TOPK), np.flatnonzero(task == NEXT_ITEM)
    for form in FORMS:
        m: dict[str, float] = {}
        for t in sorted(set(task.tolist())):
            rows = np.flatnonzero(task == t)
            m[f"{names[t]}/loss"] = float(np.mean([cols[f"loss/{form}"][i] for i in rows]))
        if len(ctr):
            p = np.asarray([cols[f"p_yes/{form}"][i] for i in ctr])
            m["ctr/auc"] = _auc(label[ctr], p)
            m["ctr/logloss"] = M.log_loss(label[ctr], p)
        if len(topk):
            tm = M.topk_metrics([cols[f"topk/{form}"][i] for i in topk], label[topk].astype(int), ks=(1, 3),
                                ndcg_ks=(5,))
            m.update({f"topk/{k}": v for k, v in tm.items() if k in ("hr@1", "hr@3", "ndcg@5")})
        for t in RATING_TASKS:
            rows = np.flatnonzero(task == t)
            if len(rows):
                r = M.regression_metrics(label[rows], [cols[f"rating/{form}"][i] for i in rows])
                m.update({f"{names[t]}/{k}": r[k] for k in ("mae", "rmse")})  # of the expected rating
        if len(nxt):
            m.update({f"next_item/{k}": v for k, v in
                      M.catalogue_metrics([cols[f"rank/{form}"][i] for i in nxt], ks=CATALOGUE_KS,
                                          ndcg_ks=CATALOGUE_KS).items()})
        report["forms"][form] = {k: v for k, v in m.items() if v is not None}
    cf_only: dict[str, float] = {}
    if len(ctr):
        cf_only["ctr/auc"] = _auc(label[ctr], np.asarray([cols["cf"][i][0] for i in ctr]))
    if len(topk):
        cf_only["topk/hr@1"] = M.topk_metrics([cols["cf"][i] for i in topk], label[topk].astype(int), ks=(1,),
                                              ndcg_ks=())["hr@1"]
    if len(nxt):
        cf_only.update({f"next_item/{k}": v for k, v in
                        M.catalogue_metrics([cols["cf"][i] for i in nxt], ks=CATALOGUE_KS,
                                            ndcg_ks=CATALOGUE_KS).items()})
    report["cf_only"] = {k: v for k, v in cf_only.items() if v is not None}
    if len(ctr) and len(set(label[ctr].tolist())) == 2:
        report["fusion"] = fusion_effect(label[ctr], *(np.asarray([cols[f"p_yes/{f}"][i] for i in ctr])
                                                       for f in FORMS), resamples=bootstrap)
    return report


def fusion_effect(y: np.ndarray, p_hybrid: np.ndarray, p_text: np.ndarray, p_permuted: np.ndarray,
                  resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """CTR AUC gaps on the same rows: hybrid - text, and the CF content's effect hybrid - permuted CF with its
    paired-bootstrap 95% percentile interval (rows resampled with replacement, both scores of a row together)."""
    import warnings

    from scipy.stats import bootstrap

    def gap(yy, a, b):
        hi, lo = M.auc(yy, a), M.auc(yy, b)
        return np.nan if hi is None or lo is None else hi - lo  # a resample with one class has no AUC

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns when some resample is degenerate; the CI is then None
        res = bootstrap((y, p_hybrid, p_permuted), gap, paired=True, vectorized=False, n_resamples=resamples,
                        confidence_level=0.95, method="percentile", random_state=np.random.default_rng(0))
    ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return {"ctr_rows": int(len(y)), "hybrid_minus_text_auc": gap(y, p_hybrid, p_text),
            "cf_effect_auc": gap(y, p_hybrid, p_permuted),
            "cf_effect_ci95": ci if all(np.isfinite(ci)) else None, "bootstrap_resamples": resamples}


def flatten(report: dict, prefix: str) -> dict[str, float]:
    """``{"forms": {"hybrid": {"ctr/auc": x}}}`` -> ``{"<prefix>/hybrid/ctr/auc": x}`` (scalars only)."""
    out = {}
    for form, m in report.get("forms", {}).items():
        out.update({f"{prefix}/{form}/{k}": v for k, v in m.items()})
    out.update({f"{prefix}/cf_only/{k}": v for k, v in report.get("cf_only", {}).items()})
    for k, v in report.get("fusion", {}).items():
        if v is None:
            continue
        if isinstance(v, list):
            out[f"{prefix}/fusion/{k}_low"], out[f"{prefix}/fusion/{k}_high"] = v
        else:
            out[f"{prefix}/fusion/{k}"] = v
    out.update({f"{prefix}/rows/{k}": v for k, v in report.get("rows", {}).items()})
    return out
