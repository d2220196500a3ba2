"""Full evaluation of a CKF checkpoint or a baseline, with Ray Data batch inference.

Usage::

    python -m ckf_dist.evaluate --checkpoint <adapter dir | run dir | Ray checkpoint dir | s3://...> \\
        [--config FILE] [key=value ...] [--out report.json] [--label NAME] [--compare other.json ...]
    python -m ckf_dist.evaluate --baseline cf-only --config FILE [key=value ...] [--out cf.json]
    python -m ckf_dist.evaluate --compare a.json b.json [--chart runs.png]      (chart + table only)

Evaluation
----------
The model is rebuilt like a training worker: the tokenizer saved in the adapter's ``tokenizer/`` folder, the
LLM of ``model.*``, the CF tables of the embedding version named in ``adapter_config.json`` and the adapter
weights (``ckf_dist.checkpoint.load_adapter``). The config is the training snapshot stored in the adapter,
then ``--config FILE``, then ``key=value`` overrides (so ``data.path``, ``eval.*`` etc. can be changed; model,
LoRA and ``cf.dim`` must stay as trained). No DeepSpeed: inference runs in ``ray.data.Dataset.map_batches``
with a callable class (``ckf_dist.eval.inference.CKFScorer``): one actor per GPU (``num_gpus=1``), or one
CPU actor without GPUs; ``eval.concurrency`` overrides. The rows are the ``eval.split`` (default test) prompt
rows of ``eval.tasks`` (default ``data.tasks``), at most ``eval.max_rows`` per task (0 = all).

Metrics (each for the groups ``all``, ``warm`` and ``cold`` = the ``is_cold`` flag of the user):

* ctr: ``auc``, ``uauc`` (mean per-user AUC over the users with both classes; ``uauc_users`` = how many),
  ``logloss``; p(Yes) = softmax over the logits of the "Yes" and "No" tokens at the first answer token where
  they differ (``scoring.answer_token_ids``; the same position serves the digits of the rating tasks, e.g. the
  "4" after a shared "▁" with a LLaMA sentencepiece tokenizer).
* topk: ``hr@1``, ``hr@5``, ``hr@10``, ``ndcg@5``, ``ndcg@10``, ``mrr`` over the row's candidates (1 positive +
  ``data.num_candidates - 1`` negatives; HR@k = 1 for k >= K). Every candidate is scored, never generated:
  score = **mean** log-probability of the candidate's title tokens + eos given the prompt (the answer as
  trained; the K candidates of a sample are K rows of one batch); ``eval.topk_score=sum`` uses the sum
  instead (favours short titles). Ties are broken uniformly at random in expectation.
* rating: ``mae``, ``rmse`` of the greedy-decoded answer (the first number in [1, 5] of the text); an
  unparsable answer is counted (``unparsable``, ``unparsable_rate``) and scored as the mean training rating
  (``fallback_rating``, from the train split of ``<data>/interactions``), never dropped. Variant:
  ``expected_mae`` / ``expected_rmse`` of the expected rating under the softmax over "1".."5".
* review_rating (opt-in task, the authors' review -> rating variant): the rating metrics above.
* explanation: greedy decoding of at most ``eval.max_new_tokens`` (32) tokens; ``bleu4`` = sacrebleu corpus
  BLEU (0-100), ``rouge_l`` = mean rouge-score ROUGE-L F1 (stemmed, x100).
* next_item (opt-in task: top-K by the item-prediction head, ``model.ckf``): the head scores every item of the
  catalogue from the hidden state at the answer position (the CF-only baseline: u.v of every item); the true
  item's rank with the row's history items excluded gives ``hr@1/5/10/20``, ``recall@k`` (= hr@k: one held-out
  item per row), ``ndcg@5/10/20``, ``mrr``; beside it the candidate-list protocol on the same scores: the
  candidates of the top-K row of the same interaction (``<split>-topk-<n>`` for ``<split>-next_item-<n>``),
  ``cand_hr@k``, ``cand_ndcg@k``, ``cand_mrr`` over ``candidate_rows`` rows (comparable with the topk task's
  metrics, which rank the same lists by title log-probability).
* every task of a model: ``loss`` = mean answer-token cross-entropy of the true answer (next_item: the item
  head's cross-entropy over the catalogue).

Report (JSON, ``--out`` or ``eval.out``; default ``eval_report.json``)::

    {"schema": "ckf-eval-report/1",
     "run": {"label", "kind": "ckf" | "cf-only", "run_name", "form", "created_at", "host", "device", "actors"},
     "checkpoint": {"path", "adapter_dir", "step"} | null, "cf_version": str,
     "config": {... the evaluated config, secrets removed ...},
     "n_rows": {task: {group: n}},
     "metrics": {task: {group: {metric: value}}},
     "timings": {"setup_s", "inference_s", "metrics_s", "total_s", "rows_per_s"},
     "notes": {... metric definitions ...}}

``--compare R1.json R2.json ...`` adds those reports to a PNG bar chart (matplotlib, Agg) of the headline
metrics per task and group, written to ``--chart`` (default: the report path with ``.png``), and prints a
table. Reports compare fairly only when they used the same data set, split and ``eval.max_rows``.

Baselines and ablations (same data, same harness, same metrics)
----------------------------------------------------------------
======================  ======================================================================================
what                    how
======================  ======================================================================================
CF-only                 ``--baseline cf-only --config FILE`` (or ``eval.baseline=cf-only``); no checkpoint.
                        Score s = u.v of the latest CF embedding version (fallback rows for unknown ids).
                        ctr: AUC/UAUC from s; log loss from sigmoid(a s + b), a, b fitted (logistic
                        regression) on the train split's CTR rows. topk: candidates ranked by s. rating:
                        clip(c s + d, 1, 5) with c, d a least-squares fit on the train interactions' ratings.
                        explanation: not applicable (absent from the report).
text-only prompts       ``eval.form=text``: evaluates the same checkpoint on the text form (no soft tokens).
text-only trained       train with ``training.curriculum=text_only``, evaluate with ``eval.form=text``.
no meta-network         train with ``cf.identity_mapping=true`` (W_u = I).
single shared LoRA      train with ``lora.task_targets=[] lora.shared_targets=[q_proj,k_proj,v_proj,o_proj]``
                        (Multi-LoRA layers then hold only the shared adapter).
no curriculum           train with ``training.curriculum=hybrid_only`` (or ``constant`` for lambda = 0.5,
                        ``two_stage`` for text then hybrid).
ID tokens (CLLM4Rec)    train with ``model.fusion=id_tokens``: one trainable token per user and item instead of
                        the meta-network mapping (initialised from the CF tables through a projector).
item-prediction head    prepare and train with ``next_item`` in ``data.tasks``, evaluate ``eval.tasks=[next_item,
                        ...]``: full-catalogue HR/NDCG/Recall@K and the candidate-list protocol (see Metrics).
mutual learning         the CF refresh job with ``cf.mutual=true`` regularises the CF vectors toward the LLM's item
                        representations exported with the adapter; compare ``--baseline cf-only`` before/after.
published protocol      ``data.source=generic`` with ``split`` / ``history`` / ``candidates`` / ``cold`` columns
                        and ``data.ctr_labels=given``: train and evaluate on the published split, rows and labels
                        (README "Benchmark protocols").
======================  ======================================================================================

The training switches are stored in the adapter's config snapshot, so evaluating an ablation needs only its
``--checkpoint``; pass ``--label`` to name it in comparisons.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.config import Config, ConfigError, resolve_data_path, resolve_embeddings_path
from ckf_dist.data import io
from ckf_dist.data.schema import TASK_IDS
from ckf_dist.eval import metrics as M

log = logging.getLogger("ckf_dist.evaluate")

REPORT_SCHEMA = "ckf-eval-report/1"
EVAL_COLUMNS = ["sample_id", "task_id", "user_id", "is_cold", "history_item_ids", "target_item_ids", "label",
                "prompt_text", "prompt_hybrid", "answer"]
TASK_NAMES = {v: k for k, v in TASK_IDS.items()}
HEADLINE = {"ctr": ["auc", "uauc", "logloss"], "topk": ["hr@1", "hr@5", "ndcg@5", "ndcg@10"],
            "rating": ["mae", "rmse"], "explanation": ["bleu4", "rouge_l"], "review_rating": ["mae", "rmse"],
            "next_item": ["hr@10", "ndcg@10", "cand_hr@1", "cand_ndcg@5"]}
NOTES = {
    "ctr": "p(Yes)=softmax over next-token logits of Yes/No; uauc over users with both classes",
    "topk": "candidates ranked by {score} log-prob of title tokens + eos; random tie-breaking in expectation",
    "rating": "greedy answer, first number in [1,5]; unparsable scored as fallback_rating (train mean) and counted; "
              "expected_* = softmax over '1'..'5'",
    "explanation": "greedy <= max_new_tokens; bleu4 = sacrebleu corpus BLEU (0-100); rouge_l = ROUGE-L F1 x100",
    "next_item": "item head (or u.v) over the whole catalogue, history items excluded: hr/recall/ndcg@k, mrr; "
                 "cand_* = the same scores over the top-K row's candidates of the same interaction",
}
SECRET_KEYS = ("access_key_id", "secret_access_key")


def _say(msg: str) -> None:
    print(f"[ckf_dist.evaluate] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- config
def build_config(base_yaml: Optional[str], argv: list[str]) -> Config:
    """Dataclass defaults <- adapter's training snapshot (``base_yaml``) <- ``--config FILE`` <- key=value."""
    from ckf_dist.config import load_config

    return load_config(argv, base_yaml=base_yaml, base_origin="adapter config snapshot")


def config_snapshot(cfg: Config) -> dict:
    snap = dataclasses.asdict(cfg)
    for key in SECRET_KEYS:
        if snap["data"]["s3"].get(key):
            snap["data"]["s3"][key] = "***"
    return snap


# --------------------------------------------------------------------------------------------- checkpoint
def resolve_adapter(uri: str, cfg: Config, workdir: str) -> tuple[str, dict]:
    """(local adapter dir, adapter_config.json) for an adapter dir, a run dir or a Ray checkpoint dir holding
    ``adapter/``, local or ``s3://`` (copied into ``workdir``)."""
    import pyarrow.fs as pafs

    from ckf_dist.checkpoint import META, WEIGHTS
    from ckf_dist.worker import ADAPTER_DIR

    fs, path = io.get_filesystem(uri, cfg.data.s3)
    for cand in (path, io.join(path, ADAPTER_DIR)):
        if io.exists(fs, io.join(cand, WEIGHTS)):
            break
    else:
        raise FileNotFoundError(f"--checkpoint {uri}: no {WEIGHTS} there nor in {ADAPTER_DIR}/ (give an adapter "
                                f"dir, <storage_path>/<run_name> or a checkpoint dir exported with an adapter)")
    if not isinstance(fs, pafs.LocalFileSystem):
        local = os.path.join(workdir, "adapter")
        pafs.copy_files(cand, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        cand = local
    with open(os.path.join(cand, META)) as f:
        return cand, json.load(f)


def load_tokenizer(adapter_dir: str):
    from transformers import AutoTokenizer

    from ckf_dist.data.schema import PLACEHOLDER

    tok = AutoTokenizer.from_pretrained(os.path.join(adapter_dir, "tokenizer"))
    if PLACEHOLDER not in tok.get_vocab():
        raise ValueError(f"tokenizer in {adapter_dir}/tokenizer lacks the {PLACEHOLDER} token")
    return tok


# -------------------------------------------------------------------------------------------------- data
def eval_tasks(cfg: Config) -> list[str]:
    return list(cfg.eval.tasks or cfg.data.tasks)


def _keep_task(batch: pa.Table, task_id: int) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("task_id"), pa.scalar(task_id, pa.int8())))


def _keep_tasks(batch: pa.Table, task_ids: list[int]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("task_id"), pa.array(task_ids, pa.int8())))


def topk_candidates(cfg: Config) -> dict[int, list[int]]:
    """{interaction number n: the candidate list of top-K row ``<split>-topk-<n>``} of ``eval.split`` (the
    next_item row ``<split>-next_item-<n>`` is built from the same interaction: ``data.prompts``); {} when the
    prepared data has no top-K rows."""
    import pyarrow.compute as pc

    rows = _read(cfg, f"prompts/{cfg.eval.split}", ["sample_id", "task_id", "target_item_ids"])
    rows = _keep_task(rows, TASK_IDS["topk"])
    n = pc.cast(pc.replace_substring_regex(rows.column("sample_id"), r"^.*-", ""), pa.int64()).to_pylist()
    return dict(zip(n, rows.column("target_item_ids").to_pylist()))


def attach_candidates(batch: pa.Table, candidates: dict[int, list[int]]) -> pa.Table:
    """Adds ``candidate_item_ids``: for a next_item row, the candidates of the top-K row of the same interaction
    (the candidate-list protocol beside the full catalogue); null for other rows or without one."""
    out = []
    for sid, task in zip(batch.column("sample_id").to_pylist(), batch.column("task_id").to_pylist()):
        out.append(candidates.get(int(sid.rsplit("-", 1)[1])) if task == TASK_IDS["next_item"] else None)
    return batch.append_column("candidate_item_ids", pa.array(out, pa.list_(pa.int64())))


def eval_dataset(cfg: Config, tasks: list[str], blocks: int = 8):
    """Ray Dataset of the raw prompt rows to evaluate: ``eval.split``, the tasks, <= ``eval.max_rows`` each;
    next_item rows gain their top-K row's candidates (``attach_candidates``).

    With ``eval.max_rows`` the split is streamed with pyarrow until every task has its first ``max_rows`` rows
    (file order: deterministic) and handed to Ray Data in ``blocks`` blocks; without it Ray Data reads it all.
    """
    ds = _eval_rows(cfg, tasks, blocks)
    if "next_item" in tasks:
        ds = ds.map_batches(attach_candidates, fn_kwargs={"candidates": topk_candidates(cfg)}, batch_format="pyarrow")
    return ds


def _eval_rows(cfg: Config, tasks: list[str], blocks: int):
    import pyarrow.dataset as pads
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    fs, p = io.get_filesystem(resolve_data_path(cfg), cfg.data.s3)
    folder = io.join(p, "prompts", cfg.eval.split)
    ids = [TASK_IDS[t] for t in tasks]
    if not cfg.eval.max_rows:
        ds = ray.data.read_parquet(folder, filesystem=fs, columns=EVAL_COLUMNS)
        return ds.map_batches(_keep_tasks, fn_kwargs={"task_ids": ids}, batch_format="pyarrow")
    want = {t: cfg.eval.max_rows for t in ids}
    parts = []
    for batch in pads.dataset(folder, filesystem=fs, format="parquet").to_batches(columns=EVAL_COLUMNS):
        table = pa.Table.from_batches([batch])
        for t in ids:
            if want[t] > 0:
                sel = _keep_task(table, t).slice(0, want[t])
                want[t] -= sel.num_rows
                if sel.num_rows:
                    parts.append(sel)
        if not any(want.values()):
            break
    table = pa.concat_tables(parts) if parts else None
    if table is None:
        return ray.data.from_items([])
    step = max(1, -(-table.num_rows // blocks))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])


def _read(cfg: Config, sub: str, columns: list[str]) -> pa.Table:
    fs, p = io.get_filesystem(resolve_data_path(cfg), cfg.data.s3)
    return pq.read_table(io.join(p, sub), filesystem=fs, columns=columns)


def train_mean_rating(cfg: Config) -> float:
    """Mean rating of the train split's interactions (the fallback for unparsable answers); 3.0 without any."""
    t = _read(cfg, "interactions", ["rating", "split"]).to_pandas()
    r = t.loc[t["split"] == "train", "rating"].dropna()
    return float(r.mean()) if len(r) else 3.0


# --------------------------------------------------------------------------------------------- baselines
def cf_baseline_tables(cfg: Config) -> tuple[str, np.ndarray, np.ndarray]:
    """(version id, users [U+1, d], items [I+1, d]) of the latest CF embedding version for the CF-only
    baseline. Raises DataMismatchError (``ckf_dist.cf.binding``) when that version was not trained on the data
    set being evaluated (another or re-prepared data set, or an unbound version)."""
    from ckf_dist.cf.binding import load_version_for_data
    from ckf_dist.data.streaming import read_manifest

    ev = load_version_for_data(resolve_embeddings_path(cfg), None, read_manifest(cfg), s3=cfg.data.s3,
                               data_path=resolve_data_path(cfg))
    users, items = ev.dense_tables()
    return ev.version, users, items


def fit_cf_baseline(cfg: Config, users: np.ndarray, items: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """((a, b) Platt scaling of u.v for CTR on the train CTR rows, (c, d) least squares rating ~ u.v on train)."""
    from sklearn.linear_model import LogisticRegression

    from ckf_dist.eval.inference import cf_dot

    ctr_fit = (1.0, 0.0)
    try:
        rows = _read(cfg, "prompts/train", ["task_id", "user_id", "target_item_ids", "label"])
        rows = _keep_task(rows, TASK_IDS["ctr"])
    except (FileNotFoundError, OSError):
        rows = None
    if rows is not None and rows.num_rows:
        items_col = np.asarray([t[0] for t in rows.column("target_item_ids").to_pylist()], dtype=np.int64)
        s = cf_dot(users, items, rows.column("user_id").to_numpy(), items_col)
        y = rows.column("label").to_numpy()
        if len(np.unique(y)) == 2:
            lr = LogisticRegression(C=1e4).fit(s[:, None], y)
            ctr_fit = (float(lr.coef_[0, 0]), float(lr.intercept_[0]))
    rating_fit = (0.0, train_mean_rating(cfg))
    t = _read(cfg, "interactions", ["user_id", "item_id", "rating", "split"]).to_pandas()
    t = t[(t["split"] == "train") & t["rating"].notna()]
    if len(t) >= 2:
        s = cf_dot(users, items, t["user_id"].to_numpy(), t["item_id"].to_numpy())
        if np.ptp(s) > 0:
            c, d = np.polyfit(s, t["rating"].to_numpy(dtype=np.float64), 1)
            rating_fit = (float(c), float(d))
    return ctr_fit, rating_fit


# ------------------------------------------------------------------------------------------------ metrics
def group_masks(is_cold: np.ndarray, groups: list[str]) -> dict[str, np.ndarray]:
    masks = {"all": np.ones_like(is_cold, dtype=bool), "warm": ~is_cold, "cold": is_cold}
    return {g: masks[g] for g in groups}


def compute_metrics(table: pa.Table, tasks: list[str], groups: list[str], fallback_rating: float,
                    has_loss: bool = True) -> tuple[dict, dict]:
    """(metrics {task: {group: {name: value}}}, n_rows {task: {group: n}}) from the scorer's output rows."""
    d = {name: table.column(name).to_pylist() for name in table.column_names}
    task = np.asarray(d["task_id"], dtype=np.int64)
    is_cold = np.asarray(d["is_cold"], dtype=bool)
    label = np.asarray(d["label"], dtype=np.float64)
    metrics, n_rows = {}, {}
    for name in tasks:
        in_task = task == TASK_IDS[name]
        metrics[name], n_rows[name] = {}, {}
        for group, gmask in group_masks(is_cold, groups).items():
            rows = np.flatnonzero(in_task & gmask)
            n_rows[name][group] = int(rows.size)
            if not rows.size:
                metrics[name][group] = {}
                continue
            pick = lambda key: [d[key][i] for i in rows]  # noqa: E731
            m: dict = {}
            if name == "ctr":
                m["auc"] = M.auc(label[rows], pick("score"))
                m["uauc"], m["uauc_users"] = M.uauc(np.asarray(d["user_id"])[rows], label[rows], pick("score"))
                m["logloss"] = M.log_loss(label[rows], pick("p_yes"))
            elif name == "topk":
                m.update(M.topk_metrics(pick("topk_scores"), label[rows].astype(int)))
            elif name == "next_item":
                m.update(M.catalogue_metrics(pick("catalogue_rank")))
                with_cands = [i for i in rows if d["candidate_pos"][i] is not None]
                m["candidate_rows"] = len(with_cands)
                cand = M.topk_metrics([d["topk_scores"][i] for i in with_cands],
                                      [d["candidate_pos"][i] for i in with_cands])
                m.update({f"cand_{k}": v for k, v in cand.items()})
            elif name in ("rating", "review_rating"):
                expected = pick("score") if has_loss else None
                m.update(M.rating_metrics(label[rows], pick("generated"), fallback_rating, expected=expected))
            elif name == "explanation":
                hyp = [g or "" for g in pick("generated")]
                if any(g is not None for g in pick("generated")):
                    m["bleu4"] = M.bleu4(hyp, pick("reference"))
                    m["rouge_l"] = M.rouge_l(hyp, pick("reference"))
            losses = [x for x in pick("loss") if x is not None]
            if losses:
                m["loss"] = float(np.mean(losses))
            metrics[name][group] = m
    return metrics, n_rows


# -------------------------------------------------------------------------------------------------- run
def run_evaluation(cfg: Config, checkpoint: Optional[str] = None, label: Optional[str] = None,
                   progress=_say) -> dict:
    """Evaluates ``checkpoint`` (or the CF-only baseline when ``eval.baseline=cf-only``); returns the report."""
    import ray

    from ckf_dist.eval.inference import CFScorer, CKFScorer
    from ckf_dist.train import init_ray

    t0 = time.time()
    baseline = cfg.eval.baseline
    if baseline == "none" and not checkpoint:
        raise ConfigError("give --checkpoint, or --baseline cf-only")
    tasks = eval_tasks(cfg)
    with tempfile.TemporaryDirectory(prefix="ckf_eval_") as work:
        ckpt_info, meta = None, {}
        if baseline == "none":
            adapter_dir, meta = resolve_adapter(checkpoint, cfg, work)
            ckpt_info = {"path": checkpoint, "adapter_dir": adapter_dir, "step": meta.get("step")}
        use_gpu = init_ray(cfg)
        gpus = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 0
        actors = cfg.eval.concurrency or max(1, gpus)
        fallback = train_mean_rating(cfg)
        remote = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
        if baseline == "cf-only":
            cf_version, users, items = cf_baseline_tables(cfg)
            ctr_fit, rating_fit = fit_cf_baseline(cfg, users, items)
            progress(f"CF-only baseline on {cf_version}: ctr sigmoid({ctr_fit[0]:.3f} s + {ctr_fit[1]:.3f}), "
                     f"rating {rating_fit[0]:.3f} s + {rating_fit[1]:.3f}")
            tasks = [t for t in tasks if t != "explanation"]
            ds = eval_dataset(cfg, tasks)
            scored = ds.map_batches(CFScorer, fn_constructor_kwargs={"user_table": users, "item_table": items,
                                                                     "ctr_fit": ctr_fit, "rating_fit": rating_fit},
                                    concurrency=1, num_cpus=1, batch_size=1024, batch_format="pyarrow")
            run_name, kind = "cf-only", "cf-only"
        else:
            ds = eval_dataset(cfg, tasks)
            tokenizer = load_tokenizer(adapter_dir)
            from ckf_dist.checkpoint import META, WEIGHTS

            files = {}
            for name in (WEIGHTS, META):
                with open(os.path.join(adapter_dir, name), "rb") as f:
                    files[name] = f.read()
            cf_version = meta.get("cf_version")
            scored = ds.map_batches(CKFScorer, fn_constructor_kwargs={
                "config": dataclasses.asdict(cfg), "tokenizer": tokenizer, "adapter_files": files,
                "cf_version": cf_version, "use_gpu": use_gpu},
                concurrency=actors, batch_size=max(cfg.eval.batch_size * 4, 32), batch_format="pyarrow", **remote)
            run_name, kind = cfg.checkpoint.run_name, "ckf"
        t_setup = time.time() - t0
        progress(f"scoring {', '.join(tasks)} rows of split '{cfg.eval.split}' "
                 f"({actors if kind == 'ckf' else 1} actor(s), {'GPU' if use_gpu else 'CPU'}, form {cfg.eval.form})")
        t1 = time.time()
        refs = scored.to_arrow_refs()
        table = pa.concat_tables([t for t in ray.get(refs) if t.num_rows]) if refs else None
        t_inf = time.time() - t1
        if table is None or table.num_rows == 0:
            raise ValueError(f"no rows of tasks {tasks} in split '{cfg.eval.split}' under {resolve_data_path(cfg)}")
        t2 = time.time()
        metrics, n_rows = compute_metrics(table, tasks, list(cfg.eval.groups), fallback, has_loss=kind == "ckf")
        t_met = time.time() - t2
    import torch

    form = cfg.eval.form if kind == "ckf" else "-"
    notes = dict(NOTES, topk=NOTES["topk"].format(score=cfg.eval.topk_score))
    return {
        "schema": REPORT_SCHEMA,
        "run": {"label": label or (f"{run_name}/{form}" if kind == "ckf" else kind), "kind": kind,
                "run_name": run_name, "form": form,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "device": (torch.cuda.get_device_name(0) if use_gpu and torch.cuda.is_available() else
                           ("GPU" if use_gpu else "CPU")),
                "actors": actors if kind == "ckf" else 1},
        "checkpoint": ckpt_info,
        "cf_version": cf_version,
        "config": config_snapshot(cfg),
        "n_rows": n_rows,
        "metrics": metrics,
        "timings": {"setup_s": t_setup, "inference_s": t_inf, "metrics_s": t_met, "total_s": time.time() - t0,
                    "rows_per_s": table.num_rows / max(t_inf, 1e-9)},
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------- output/compare
def write_report(report: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=_json_default)
    return path


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    if report.get("schema") != REPORT_SCHEMA:
        raise ValueError(f"{path}: not a {REPORT_SCHEMA} report (schema={report.get('schema')!r})")
    return report


def _headline(reports: list[dict]) -> list[tuple[str, str]]:
    out = []
    for task, names in HEADLINE.items():
        for name in names:
            if any(r["metrics"].get(task, {}).get("all", {}).get(name) is not None for r in reports):
                out.append((task, name))
    return out


def comparison_table(reports: list[dict]) -> str:
    cols = _headline(reports)
    labels = [r["run"]["label"] for r in reports]
    width = max([len(x) for x in labels] + [10])
    lines = [f"{'run':{width}s} " + " ".join(f"{t[:4]}/{n:>8s}" for t, n in cols)]
    for r, lab in zip(reports, labels):
        vals = []
        for t, n in cols:
            v = r["metrics"].get(t, {}).get("all", {}).get(n)
            vals.append(f"{v:13.4f}" if isinstance(v, (int, float)) else " " * 13)
        lines.append(f"{lab:{width}s} " + " ".join(vals))
    return "\n".join(lines)


def plot_comparison(reports: list[dict], path: str) -> str:
    """Bar chart: one panel per headline metric, groups on the x axis, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _headline(reports)
    if not cols:
        raise ValueError("the reports share no headline metric to plot")
    groups = [g for g in ("all", "warm", "cold") if any(g in r["n_rows"].get(t, {}) for r in reports for t, _ in cols)]
    ncol = min(4, len(cols))
    nrow = (len(cols) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    width = 0.8 / len(reports)
    for ax, (task, name) in zip(axes.flat, cols):
        for j, r in enumerate(reports):
            vals = [r["metrics"].get(task, {}).get(g, {}).get(name) for g in groups]
            xs = np.arange(len(groups)) + (j - (len(reports) - 1) / 2) * width
            ax.bar(xs, [np.nan if v is None else v for v in vals], width, label=r["run"]["label"])
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_title(f"{task} {name}")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(reports), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SUMMARY = ("Evaluates a CKF checkpoint (or the CF-only baseline) with Ray Data batch inference on eval.split and writes "
           "a JSON report: CTR AUC/UAUC/log loss, top-K HR/NDCG/MRR over every candidate, rating MAE/RMSE, explanation "
           "BLEU-4/ROUGE-L, each for all, warm and cold users; --compare charts several reports. The config is the "
           "adapter's training snapshot, then --config FILE, then key=value (the module docstring has the metrics and "
           "the ablation switches).")


def _option_rows(parser) -> list[tuple[str, str]]:
    """(flags, doc) of the parser's own options, for ``cli_help``."""
    rows = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        meta = action.metavar or (("{" + ",".join(action.choices) + "}") if action.choices else action.dest.upper())
        arg = f"{meta} [{meta} ...]" if action.nargs == "+" else meta
        rows.append((", ".join(action.option_strings) + ("" if action.nargs == 0 else f" {arg}"), action.help or ""))
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m ckf_dist.evaluate``; everything else is ``--config FILE`` / ``key=value``."""
    parser = argparse.ArgumentParser(prog="python -m ckf_dist.evaluate", add_help=False)
    parser.add_argument("--checkpoint", help="adapter dir, run dir, Ray checkpoint dir (local or s3://)")
    parser.add_argument("--baseline", choices=["none", "cf-only"], help="same as eval.baseline=...")
    parser.add_argument("--out", help="report path (same as eval.out=...)")
    parser.add_argument("--label", help="run name in comparisons (default <run_name>/<form>)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="REPORT", help="other reports to chart")
    parser.add_argument("--chart", help="PNG path of the comparison chart (default: report path with .png)")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, the config part of the command line) without evaluating anything; the config part is checked
    against the defaults (the adapter's snapshot, read at run time, only changes the defaults). Raises
    ConfigError for a bad key or file, SystemExit (argparse) for a bad option."""
    args, rest = build_parser().parse_known_args(argv)
    build_config(None, rest + ([f"eval.baseline={args.baseline}"] if args.baseline else []))
    return args, rest


def main(argv=None) -> int:
    from ckf_dist.config import cli_help, show_help, wants_help

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if wants_help(argv):
        return show_help(cli_help("python -m ckf_dist.evaluate", SUMMARY, _option_rows(parser)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, rest = parser.parse_known_args(argv)
    try:
        others = [load_report(p) for p in args.compare]
        if args.baseline:
            rest = rest + [f"eval.baseline={args.baseline}"]
        cfg = build_config(None, rest)
        if not args.checkpoint and cfg.eval.baseline == "none":
            if not others:
                parser.error("give --checkpoint, --baseline cf-only, or --compare REPORT...")
            chart = args.chart or os.path.splitext(args.out or "eval_compare.json")[0] + ".png"
            print(comparison_table(others))
            _say(f"chart: {plot_comparison(others, chart)}")
            return 0
        base_yaml = None
        if args.checkpoint and cfg.eval.baseline == "none":
            with tempfile.TemporaryDirectory() as tmp:
                base_yaml = resolve_adapter(args.checkpoint, cfg, tmp)[1].get("config_yaml")
            cfg = build_config(base_yaml, rest)
        report = run_evaluation(cfg, checkpoint=args.checkpoint, label=args.label)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"ckf_dist.evaluate: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or cfg.eval.out or "eval_report.json"
    write_report(report, out)
    print(comparison_table([report] + others))
    _say(f"report: {out}")
    if others:
        chart = args.chart or os.path.splitext(out)[0] + ".png"
        _say(f"chart: {plot_comparison([report] + others, chart)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
