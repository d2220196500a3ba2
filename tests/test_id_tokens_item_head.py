"""Issue 18 items 1-2: ``model.fusion=id_tokens`` and the ``next_item`` task's item-prediction head (fast tests;
the end-to-end run through train + evaluate is ``test_id_tokens_and_item_head_train_and_evaluate_end_to_end``)."""
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from ckf_dist.config import CFConfig, DataConfig, LoRAConfig, ModelConfig, TinyModelConfig
from ckf_dist.data.schema import TASK_IDS
from ckf_dist.eval import metrics as M
from ckf_dist.heldout import permutation_orders, permuted_tables
from ckf_dist.model.ckf import CKFModel
from ckf_dist.model.llm import build_llm, build_tiny_tokenizer
from ckf_dist.model.multi_lora import FIRST_TASK_SLOTS, MultiLoRALinear, TaskSegments

NEXT = TASK_IDS["next_item"]
TEXTS = ["The user interacted with: red comet; blue river. Which item will the user choose next? green hill",
         "Yes", "No"] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TEXTS, vocab_size=300)


def _model(tokenizer, fusion="soft_tokens", n_users=7, n_items=11, cf_dim=4, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                           intermediate_size=64, vocab_size=300))
    llm = build_llm(cfg, tokenizer)
    g = torch.Generator().manual_seed(seed + 100)
    users, items = torch.randn(n_users + 1, cf_dim, generator=g), torch.randn(n_items + 1, cf_dim, generator=g)
    return CKFModel(llm, users, items, tokenizer.convert_tokens_to_ids("<cf>"), len(TASK_IDS), CFConfig(dim=cf_dim),
                    LoRAConfig(rank=4, alpha=8, dropout=0.0), fusion=fusion, next_item_task=NEXT)


def _batch(tokenizer, tasks, hybrid, labels, length=12, n_targets=None, seed=1):
    """Padded rows (already sorted by task): prompt ids with 1 + n_targets placeholders in hybrid rows, a 2-token
    answer at the end of each row."""
    g = torch.Generator().manual_seed(seed)
    ph = tokenizer.convert_tokens_to_ids("<cf>")
    n = len(tasks)
    n_targets = torch.tensor(n_targets or [0] * n)
    ids = torch.randint(5, 200, (n, length), generator=g)
    for r in range(n):
        if hybrid[r]:
            ids[r, 1:2 + int(n_targets[r])] = ph
    labels_tok = torch.full((n, length), -100)
    labels_tok[:, -2:] = ids[:, -2:]
    task_ids = torch.tensor(tasks)
    targets = torch.full((n, max(1, int(n_targets.max()))), -1)
    for r in range(n):
        targets[r, :int(n_targets[r])] = torch.arange(int(n_targets[r])) + r
    return {"input_ids": ids, "labels": labels_tok, "attention_mask": torch.ones(n, length, dtype=torch.long),
            "task_ids": task_ids, "is_hybrid": torch.tensor(hybrid), "user_ids": torch.arange(n),
            "n_targets": n_targets, "history": torch.randint(0, 11, (n, 3), generator=g), "targets": targets,
            "label": torch.tensor(labels, dtype=torch.float32),
            "row_offsets": torch.tensor(np.concatenate([[0], np.cumsum(np.bincount(tasks, minlength=len(TASK_IDS)))]))}


# ------------------------------------------------------------------------------------------------ ID tokens
def test_id_tokens_replace_the_mapping_side_and_start_as_a_projection_of_the_cf_tables(tokenizer):
    model = _model(tokenizer, fusion="id_tokens")
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("meta_net", "pooling", "user_proj", "item_proj")) for n in names)
    assert model.user_tokens.weight.shape == (8, 32) and model.item_tokens.weight.shape == (12, 32)
    assert model.item_tokens.weight.requires_grad and not model.llm.get_input_embeddings().weight.requires_grad
    # initialised through a linear projector: every token is an affine function of its CF row (exact fit)
    for table, tokens in ((model.user_table, model.user_tokens), (model.item_table, model.item_tokens)):
        x = torch.cat([table.double(), torch.ones(table.shape[0], 1, dtype=torch.float64)], 1)
        y = tokens.weight.detach().double()
        coef = torch.linalg.lstsq(x, y).solution
        assert torch.allclose(x @ coef, y, atol=1e-5)
        assert y.std() > 0.05  # not a constant


def test_id_tokens_go_where_the_soft_tokens_go_with_the_fallback_row_for_unknown_ids(tokenizer):
    model = _model(tokenizer, fusion="id_tokens").eval()
    ph = model.placeholder_id
    ids = torch.tensor([[3, ph, 9, ph, 8, ph, 7], [3, ph, 9, 10, ph, 5, 6]])
    user_ids = torch.tensor([2, 99])  # 99: not in the table -> fallback row 7
    targets = torch.tensor([[4, 50], [1, -1]])  # 50 -> item fallback row 11
    out = model.embed_with_soft_tokens(ids, torch.tensor([2, 1]), user_ids, torch.full((2, 3), -1), targets,
                                       torch.tensor([True, True]))
    u, v = model.user_tokens.weight, model.item_tokens.weight
    assert torch.equal(out[0, 1], u[2]) and torch.equal(out[0, 3], v[4]) and torch.equal(out[0, 5], v[11])
    assert torch.equal(out[1, 1], u[7]) and torch.equal(out[1, 4], v[1])
    words = model.llm.get_input_embeddings()(ids)
    assert torch.equal(out[0, 2], words[0, 2])
    # negative ids (padding) and ids past the table, the fallback row 7 itself included, all read the fallback
    assert model._rows(0, torch.tensor([-3, -1, 0, 6, 7, 99]), 8).tolist() == [7, 7, 0, 6, 7, 7]


def test_id_token_gradients_reach_only_the_tokens_in_the_batch(tokenizer):
    model = _model(tokenizer, fusion="id_tokens").train()
    b = _batch(tokenizer, tasks=[0, 0], hybrid=[True, True], labels=[1, 0], n_targets=[1, 1])
    model(b)["loss"].backward()
    grad = model.item_tokens.weight.grad
    used = {0, 1}  # targets of rows 0 and 1
    assert all(grad[i].abs().sum() > 0 for i in used)
    assert all(grad[i].abs().sum() == 0 for i in range(12) if i not in used)
    assert model.user_tokens.weight.grad[0].abs().sum() > 0 and model.user_tokens.weight.grad[5].abs().sum() == 0


@pytest.mark.parametrize("fusion", ["soft_tokens", "id_tokens"])
def test_cf_permutation_equals_permuted_tables(tokenizer, fusion):
    """The held-out control reorders rows by ``cf_permutation``; for soft tokens this must be exactly the
    permuted tables of before (the fusion figures in the README were measured that way)."""
    model = _model(tokenizer, fusion=fusion).eval()
    ph = model.placeholder_id
    ids = torch.tensor([[3, ph, 9, ph, 8, ph]])
    n_targets, users, hist, targets, hyb = (torch.tensor([2]), torch.tensor([2]), torch.tensor([[3, 5]]),
                                            torch.tensor([[4, 1]]), torch.tensor([True]))
    plain = model.embed_with_soft_tokens(ids, n_targets, users, hist, targets, hyb)
    if fusion == "soft_tokens":
        orders = permutation_orders(model.user_table.shape[0], model.item_table.shape[0])
        model.cf_permutation = orders
        permuted = model.embed_with_soft_tokens(ids, n_targets, users, hist, targets, hyb)
        model.cf_permutation = None
        u, i = model.user_table, model.item_table
        model.set_cf_tables(*permuted_tables(u, i))
        want = model.embed_with_soft_tokens(ids, n_targets, users, hist, targets, hyb)
        model.set_cf_tables(u, i)
        assert torch.equal(permuted, want)
    else:
        orders = permutation_orders(model.user_tokens.num_embeddings, model.item_tokens.num_embeddings)
        model.cf_permutation = orders
        permuted = model.embed_with_soft_tokens(ids, n_targets, users, hist, targets, hyb)
        model.cf_permutation = None
        assert torch.equal(permuted[0, 1], model.user_tokens.weight[orders[0][2]])
        assert torch.equal(permuted[0, 3], model.item_tokens.weight[orders[1][4]])
    assert not torch.equal(permuted, plain)


# ------------------------------------------------------------------------------------------- item head
@pytest.mark.parametrize("fusion", ["soft_tokens", "id_tokens"])
def test_item_head_loss_is_the_catalogue_cross_entropy_at_the_answer_position(tokenizer, fusion):
    model = _model(tokenizer, fusion=fusion).eval()
    b = _batch(tokenizer, tasks=[0, NEXT, NEXT], hybrid=[True, True, False], labels=[1, 6, 10], n_targets=[1, 0, 0])
    out = model(b, text_weight=0.5)
    assert out["next_item_rows"].tolist() == [1, 2]
    assert out["item_logits"].shape == (2, 11)  # the catalogue: 11 items, the fallback row excluded
    hidden = model.llm.get_decoder()(inputs_embeds=model.embed_with_soft_tokens(
        b["input_ids"], b["n_targets"], b["user_ids"], b["history"], b["targets"], b["is_hybrid"]),
        attention_mask=b["attention_mask"]).last_hidden_state
    h = hidden[[1, 2], -3]  # position L-3 predicts the first answer token (L-2)
    weights = model.item_tokens.weight[:-1] if fusion == "id_tokens" else model.item_proj(model.item_table[:-1])
    logits = h.float() @ weights.float().t()
    assert torch.allclose(out["item_logits"], logits, atol=1e-5)
    want = F.cross_entropy(logits, torch.tensor([6, 10]), reduction="none")
    assert torch.allclose(out["row_loss"][1:], want, atol=1e-5)


def test_item_head_trains_the_item_embeddings_and_rejects_labels_outside_the_catalogue(tokenizer):
    model = _model(tokenizer).train()
    b = _batch(tokenizer, tasks=[NEXT, NEXT], hybrid=[True, False], labels=[3, 4])
    model(b)["loss"].backward()
    assert model.item_proj.weight.grad.abs().sum() > 0
    b = _batch(tokenizer, tasks=[NEXT], hybrid=[False], labels=[11])
    with pytest.raises(ValueError, match="outside the catalogue"):
        model(b)


@pytest.mark.parametrize("fusion", ["soft_tokens", "id_tokens"])
def test_item_head_runs_and_gets_a_gradient_without_next_item_rows(tokenizer, fusion):
    """Under ZeRO-3 every rank must call the same modules and reduce the same gradients whatever its batch holds:
    a batch without next_item rows still computes the head's weights and back-propagates (zeros) into them."""
    model = _model(tokenizer, fusion=fusion).train()
    calls = []
    head = model.item_tokens if fusion == "id_tokens" else model.item_proj
    head.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    b = _batch(tokenizer, tasks=[0, 0], hybrid=[False, False], labels=[1, 0])
    out = model(b)
    assert "item_logits" not in out and calls and calls[-1][0] == 11  # the whole catalogue, once
    out["loss"].backward()
    grad = head.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    torch.manual_seed(0)
    with torch.no_grad():  # evaluation: the same weights, no anchor needed
        model(b)
    assert calls[-1][0] == 11


def test_a_sixth_task_slot_leaves_the_first_five_slots_initial_values_unchanged():
    base = torch.nn.Linear(16, 8)
    inits = []
    for tasks in (5, 6):
        torch.manual_seed(7)
        layers = [MultiLoRALinear(base, TaskSegments(), tasks, 4, 8.0, 0.0, shared=True, per_task=True,
                                  layer_index=i) for i in range(2)]
        inits.append(layers)
    for five, six in zip(*inits):
        assert torch.equal(five.shared_a, six.shared_a)
        assert torch.equal(five.task_a, six.task_a[:FIRST_TASK_SLOTS])
    assert not torch.equal(inits[1][0].task_a[5], inits[1][1].task_a[5])  # per layer
    assert inits[1][0].task_a[5].abs().max() <= 1 / 16 ** 0.5 and inits[1][0].task_a[5].std() > 0


# ------------------------------------------------------------------------------------------------ metrics
def test_catalogue_rank_range_excludes_history_and_counts_ties():
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.7])
    assert M.catalogue_rank_range(scores, 1, exclude=[]) == (2, 1)  # 0.9 and 0.7 above, item 2 ties
    assert M.catalogue_rank_range(scores, 1, exclude=[0, 2]) == (1, 0)
    assert M.catalogue_rank_range(scores, 1, exclude=[1]) == (2, 1)  # the label itself is never excluded
    m = M.catalogue_metrics([(0, 0), (4, 0), (1, 1)], ks=(1, 5), ndcg_ks=(5,))
    assert m["hr@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert m["hr@5"] == pytest.approx(1.0) and m["recall@5"] == m["hr@5"]
    want_ndcg = (1.0 + 1 / np.log2(6) + (1 / np.log2(3) + 1 / np.log2(4)) / 2) / 3
    assert m["ndcg@5"] == pytest.approx(want_ndcg)
    # a row the head could not score (answer cut off by data.max_seq_len) is a miss, not dropped
    assert M.catalogue_metrics([(0, 0), None], ks=(1,), ndcg_ks=()) == {"hr@1": 0.5, "mrr": pytest.approx(0.5),
                                                                       "recall@1": 0.5}


# -------------------------------------------------------------------------------------------------- data
def test_next_item_rows_are_candidate_free_and_match_the_topk_row_of_the_same_interaction():
    """next_item rows: one placeholder, no targets, label = the true item; row n is the interaction of top-K row n
    (evaluate.attach_candidates relies on it), whose positive candidate is that same item."""
    from ckf_dist.data import synthetic
    from ckf_dist.data.canonical import build_canonical
    from ckf_dist.data.prompts import build_prompts
    from ckf_dist.evaluate import attach_candidates

    cfg = DataConfig(num_users=40, num_items=50, num_clusters=3, interactions_per_user=10, seed=3,
                     tasks=["ctr", "topk", "next_item"])
    raw = synthetic.read(cfg)
    data = build_canonical(raw, cfg)
    prompts = build_prompts(data, cfg, raw.has_ratings, raw.has_reviews, raw.source)
    without = build_prompts(data, DataConfig(**{**cfg.__dict__, "tasks": ["ctr", "topk"]}), raw.has_ratings,
                            raw.has_reviews, raw.source)
    for split in ("train", "test"):
        t = prompts.tables[split].to_pylist()
        nxt = {r["sample_id"].rsplit("-", 1)[1]: r for r in t if r["task"] == "next_item"}
        topk = {r["sample_id"].rsplit("-", 1)[1]: r for r in t if r["task"] == "topk"}
        assert nxt and set(nxt) == set(topk)
        for n, r in nxt.items():
            assert r["target_item_ids"] == [] and r["prompt_hybrid"].count("<cf>") == 1
            assert r["prompt_hybrid"].endswith("Which item will the user choose next?")
            assert "Candidates" not in r["prompt_text"]
            k = topk[n]
            assert k["target_item_ids"][int(k["label"])] == int(r["label"])
            assert k["history_item_ids"] == r["history_item_ids"] and k["user_id"] == r["user_id"]
        # the other tasks' rows are the same with or without next_item (own generators per task)
        others = sorted((r["sample_id"], r["prompt_hybrid"], r["label"]) for r in t if r["task"] != "next_item")
        assert others == sorted((r["sample_id"], r["prompt_hybrid"], r["label"])
                                for r in without.tables[split].to_pylist())
    test = prompts.tables["test"]
    cands = {int(r["sample_id"].rsplit("-", 1)[1]): r["target_item_ids"] for r in test.to_pylist() if r["task"] == "topk"}
    out = attach_candidates(test, cands).to_pylist()
    for r in out:
        if r["task"] == "next_item":
            assert int(r["label"]) in r["candidate_item_ids"]
        else:
            assert r["candidate_item_ids"] is None


def test_next_item_metrics_from_scorer_rows():
    from ckf_dist.evaluate import compute_metrics
    from ckf_dist.eval.inference import OUT_SCHEMA

    rows = {name: [None] * 3 for name in OUT_SCHEMA.names}
    rows.update(sample_id=["a", "b", "c"], task_id=[NEXT] * 3, user_id=[1, 2, 3], is_cold=[False, False, True],
                label=[4.0, 7.0, 9.0], catalogue_rank=[[0, 0], [12, 0], [3, 1]], candidate_pos=[0, 2, None],
                topk_scores=[[0.9, 0.1], [0.5, 0.2, 0.1], None], loss=[1.0, 2.0, 3.0])
    table = pa.table({f.name: pa.array(rows[f.name], f.type) for f in OUT_SCHEMA}, schema=OUT_SCHEMA)
    metrics, n = compute_metrics(table, ["next_item"], ["all", "cold"], 3.0)
    m = metrics["next_item"]["all"]
    assert n["next_item"] == {"all": 3, "cold": 1}
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@10"] == pytest.approx(2 / 3) and m["hr@20"] == 1.0
    assert m["hr@5"] == pytest.approx(2 / 3)  # ranks 0, 12, 3..4
    assert m["candidate_rows"] == 2 and m["cand_hr@1"] == pytest.approx(0.5) and m["loss"] == pytest.approx(2.0)
    assert metrics["next_item"]["cold"]["candidate_rows"] == 0 and "cand_hr@1" not in metrics["next_item"]["cold"]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.integration
def test_id_tokens_and_item_head_train_and_evaluate_end_to_end(tmp_path):
    """``model.fusion=id_tokens`` with the ``next_item`` task through the real pipeline (local Ray, DeepSpeed
    ZeRO-3, tiny model): train, the held-out evaluation's item-head metrics (CF-only beside them), then
    ``python -m ckf_dist.evaluate`` with full-catalogue and candidate-list metrics. (The CF-only scorer's
    next_item rows: ``test_cf_only_next_item_rows_rank_u_dot_v_over_the_catalogue``.)"""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = [f"data.path={tmp_path}/data", "data.num_users=40", "data.num_items=30", "data.interactions_per_user=8",
              "data.tasks=[ctr,topk,next_item]", "cf.epochs=3", "cf.reader=arrow", "model.tiny.vocab_size=400",
              "model.tiny.pretrain_steps=10", "lora.rank=4", "lora.alpha=8", "model.fusion=id_tokens",
              "ray.local_num_cpus=2", f"checkpoint.storage_path={tmp_path}/runs", "checkpoint.run_name=ids"]
    env = dict(os.environ, HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    train = subprocess.run([sys.executable, "-m", "ckf_dist.train", *common, "training.max_steps=4",
                            "training.batch_size=8", "training.eval_rows=8", "checkpoint.every_steps=4"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    log = train.stdout + train.stderr
    assert train.returncode == 0 and "done: step 4" in log, log[-4000:]
    metrics = json.loads((tmp_path / "runs" / "ids" / "metrics.json").read_text())
    after = metrics["after"]
    assert after["rows"]["next_item"] > 0
    for form in ("hybrid", "text", "hybrid_cf_permuted"):
        assert 0.0 <= after["forms"][form]["next_item/hr@10"] <= 1.0
    assert 0.0 <= after["cf_only"]["next_item/hr@10"] <= 1.0
    adapter = load_file(str(tmp_path / "runs" / "ids" / "adapter" / "adapter.safetensors"))
    assert adapter["item_tokens.weight"].shape[0] == 31 and not any(k.startswith("meta_net") for k in adapter)

    out = tmp_path / "eval.json"
    ev = subprocess.run([sys.executable, "-m", "ckf_dist.evaluate", "--checkpoint", str(tmp_path / "runs" / "ids"),
                         f"--out={out}", *common, "eval.tasks=[topk,next_item]", "eval.max_rows=20",
                         "eval.batch_size=16"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    report = json.loads(out.read_text())
    m = report["metrics"]["next_item"]["all"]
    assert report["n_rows"]["next_item"]["all"] == report["n_rows"]["topk"]["all"] == 20
    assert m["candidate_rows"] == 20 and 0.0 <= m["cand_hr@1"] <= m["cand_hr@5"] <= 1.0
    assert 0.0 <= m["hr@1"] <= m["hr@10"] <= m["hr@20"] <= 1.0 and m["recall@10"] == m["hr@10"]
    assert np.isfinite(m["loss"]) and m["loss"] > 0


def test_cf_only_next_item_rows_rank_u_dot_v_over_the_catalogue():
    from ckf_dist.eval.inference import CFScorer

    g = np.random.default_rng(0)
    users, items = g.normal(size=(5, 3)), g.normal(size=(9, 3))  # 4 users, 8 items + fallback rows
    batch = pa.table({"sample_id": ["test-next_item-0", "test-next_item-1"], "task_id": pa.array([NEXT, NEXT], pa.int8()),
                      "user_id": [1, 3], "is_cold": [False, True], "label": pa.array([2.0, 7.0], pa.float32()),
                      "history_item_ids": [[0, 5], []], "target_item_ids": pa.array([[], []], pa.list_(pa.int64())),
                      "answer": ["a", "b"], "candidate_item_ids": pa.array([[6, 2, 4], None], pa.list_(pa.int64()))})
    out = CFScorer(users, items, (1.0, 0.0), (0.0, 3.0))(batch).to_pylist()
    for r, u, label, hist in ((out[0], 1, 2, {0, 5}), (out[1], 3, 7, set())):
        dots = items[:-1] @ users[u]
        ranked = [i for i in np.argsort(-dots) if i not in hist]
        assert r["catalogue_rank"] == [ranked.index(label), 0]
    assert out[0]["topk_scores"] == pytest.approx([items[c] @ users[1] for c in (6, 2, 4)])
    assert out[0]["candidate_pos"] == 1 and out[1]["candidate_pos"] is None and out[1]["topk_scores"] is None
