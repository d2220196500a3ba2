"""The held-out report (ckf_dist.heldout): exact metrics on hand-made scored rows, the permuted-CF control, the
paired bootstrap, and the optimizer groups / curriculum gates the training loop uses."""
import numpy as np
import pytest
import torch

from ckf_dist import heldout as H
from ckf_dist.data.schema import TASK_IDS

CTR, TOPK, RATING, EXPL = (TASK_IDS[t] for t in ("ctr", "topk", "rating", "explanation"))


def _rows():
    """4 CTR rows, 2 top-K rows (3 candidates), 2 rating rows, 1 explanation row, scored by hand."""
    n = 9
    part = {"task": [CTR] * 4 + [TOPK] * 2 + [RATING] * 2 + [EXPL], "label": [1, 0, 1, 0, 0, 2, 4, 2, -1],
            "is_cold": [False] * n,
            "cf": [[0.1], [0.9], [0.5], [0.2], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0], [0.0], [0.0]]}
    p_yes = {"hybrid": [0.9, 0.2, 0.6, 0.4], "text": [0.3, 0.6, 0.8, 0.1], "hybrid_cf_permuted": [0.5] * 4}
    topk = {"hybrid": [[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]], "text": [[1.0, 3.0, 2.0], [0.0, 1.0, 5.0]],
            "hybrid_cf_permuted": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]}
    rating = {"hybrid": [3.5, 2.5], "text": [4.0, 4.0], "hybrid_cf_permuted": [3.0, 3.0]}
    for f in H.FORMS:
        part[f"p_yes/{f}"] = p_yes[f] + [None] * 5
        part[f"topk/{f}"] = [None] * 4 + topk[f] + [None] * 3
        part[f"rating/{f}"] = [None] * 6 + rating[f] + [None]
        part[f"loss/{f}"] = [0.1, 0.3, 0.5, 0.7, 1.0, 2.0, 0.2, 0.4, 3.0]
    return part


def test_summary_exact_values_on_hand_made_rows():
    # split the rows over two "ranks" to check the gathering too
    part = _rows()
    first = {k: v[:5] for k, v in part.items()}
    second = {k: v[5:] for k, v in part.items()}
    report = H.summarize_heldout([first, second], bootstrap=50)
    assert report["rows"] == {"ctr": 4, "topk": 2, "rating": 2, "explanation": 1}
    hyb, text, perm = (report["forms"][f] for f in H.FORMS)
    # AUC by pair counting: hybrid ranks every positive above every negative; text 3 of 4 pairs; perm all ties
    assert hyb["ctr/auc"] == 1.0 and text["ctr/auc"] == 0.75 and perm["ctr/auc"] == 0.5
    # top-K: hybrid hits row 1 (positive 0 scores 3), misses row 2 (positive 2 is 2nd); text: the reverse
    assert hyb["topk/hr@1"] == 0.5 and text["topk/hr@1"] == 0.5
    assert text["topk/hr@3"] == 1.0 and perm["topk/hr@1"] == pytest.approx(1 / 3)  # 3-way tie: 1/3 expected
    assert hyb["rating/mae"] == pytest.approx(0.5) and hyb["rating/rmse"] == pytest.approx(0.5)
    assert text["rating/mae"] == pytest.approx(1.0) and text["rating/rmse"] == pytest.approx(np.sqrt(2.0))
    assert hyb["ctr/loss"] == pytest.approx(0.4) and hyb["topk/loss"] == pytest.approx(1.5)
    assert hyb["explanation/loss"] == pytest.approx(3.0)
    logloss = -np.mean(np.log([0.9, 0.8, 0.6, 0.6]))
    assert hyb["ctr/logloss"] == pytest.approx(logloss)
    # CF-only: u.v of the target (positives 0.1, 0.5 vs negatives 0.9, 0.2: 1 of 4 pairs); top-K misses both
    assert report["cf_only"] == {"ctr/auc": 0.25, "topk/hr@1": 0.0}
    fusion = report["fusion"]
    assert fusion["hybrid_minus_text_auc"] == pytest.approx(0.25) and fusion["cf_effect_auc"] == pytest.approx(0.5)
    assert fusion["ctr_rows"] == 4
    flat = H.flatten(report, "after")
    assert flat["after/hybrid/ctr/auc"] == 1.0 and flat["after/cf_only/ctr/auc"] == 0.25
    assert flat["after/rows/ctr"] == 4


def test_fusion_effect_interval_is_paired_and_contains_the_estimate():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400).astype(float)
    noise = rng.normal(size=400)
    p_hybrid = y + noise  # informative
    p_permuted = y * 0.2 + noise  # the same rows' noise, weaker signal: a paired comparison
    out = H.fusion_effect(y, p_hybrid, p_hybrid, p_permuted, resamples=300)
    lo, hi = out["cf_effect_ci95"]
    assert lo < out["cf_effect_auc"] < hi and lo > 0.1
    assert out["hybrid_minus_text_auc"] == 0.0
    # no signal difference: the interval straddles zero
    same = H.fusion_effect(y, p_hybrid, p_hybrid, p_hybrid + 1e-9 * rng.normal(size=400), resamples=300)
    assert same["cf_effect_ci95"][0] <= 0.0 <= same["cf_effect_ci95"][1]


def test_permuted_tables_keep_every_row_and_the_fallback():
    users, items = torch.arange(11.0).reshape(-1, 1).repeat(1, 3), torch.arange(21.0).reshape(-1, 1)
    pu, pi = H.permuted_tables(users, items)
    assert torch.equal(pu[-1], users[-1]) and torch.equal(pi[-1], items[-1])  # fallback rows stay
    assert sorted(pu[:, 0].tolist()) == users[:, 0].tolist() and sorted(pi[:, 0].tolist()) == items[:, 0].tolist()
    assert (pu[:-1, 0] != users[:-1, 0]).sum() >= 8  # really permuted (fixed seed)
    again = H.permuted_tables(users, items)
    assert torch.equal(again[0], pu) and torch.equal(again[1], pi)  # same permutation every evaluation


def test_parameter_groups_and_curriculum_gates():
    from ckf_dist.config import load_config
    from ckf_dist.model.llm import build_tiny_tokenizer
    from ckf_dist.worker import build_ckf_model, curriculum_gates, parameter_groups

    cfg = load_config(["model.tiny.hidden_size=16", "model.tiny.intermediate_size=32", "model.tiny.vocab_size=300",
                       "training.max_steps=100", "training.mapping_lr=0.02"])
    tok = build_tiny_tokenizer(["The user liked noir 1. Yes No 1 2 3 4 5"] * 5, 300)
    model = build_ckf_model(cfg, tok, torch.randn(5, 8), torch.randn(7, 8))
    groups = parameter_groups(model, cfg)
    assert [g["name"] for g in groups] == ["lora", "mapping"]
    assert [g["lr"] for g in groups] == [cfg.training.lr, 0.02]
    names = {id(p): n for n, p in model.named_parameters()}
    lora = {names[id(p)] for p in groups[0]["params"]}
    mapping = {names[id(p)] for p in groups[1]["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora | mapping == trainable and not lora & mapping
    assert all(("shared_" in n or "task_" in n) for n in lora)
    assert {n.split(".")[0] for n in mapping} == {"meta_net", "user_proj", "item_proj"}  # mean pooling: no weights
    lora_gate, map_gate = curriculum_gates(cfg)  # joint (default)
    assert lora_gate(0) == 1.0 and lora_gate(100) == 1.0
    assert map_gate(0) == pytest.approx(1 - 1 / (1 + np.exp(-8))) and map_gate(100) == pytest.approx(1.0, abs=1e-3)
    spec = load_config(["training.gradient_routing=spec", "training.max_steps=100"])
    lora_gate, map_gate = curriculum_gates(spec)
    assert lora_gate(0) == pytest.approx(1 / (1 + np.exp(-8))) and lora_gate(100) == pytest.approx(0.0, abs=1e-3)
    assert lora_gate(50) == pytest.approx(0.5) and map_gate(50) == pytest.approx(0.5)
    text_only = load_config(["training.curriculum=text_only"])
    assert curriculum_gates(text_only)[1](0) == 0.0  # the mapping side never trains on a text-only schedule
