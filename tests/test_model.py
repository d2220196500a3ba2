import math

import pytest
import torch

from ckf_dist.config import CFConfig, LoRAConfig, ModelConfig, TinyModelConfig
from ckf_dist.kernels import multi_lora_linear_per_row, segment_offsets
from ckf_dist.model.ckf import CKFModel, curriculum_text_weight
from ckf_dist.model.llm import build_llm, build_tiny_tokenizer
from ckf_dist.model.multi_lora import MultiLoRALinear, TaskSegments

TEXTS = ["The user liked red comet; blue river. Will the user enjoy green hill? Answer Yes or No.",
         "Yes", "No", "1", "2", "3", "4", "5", "How will the user rate dark noir 17? Answer 1 to 5."] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TEXTS, vocab_size=300)


def _model(tokenizer, cf_dim=4, n_users=7, n_items=11, pooling="mean", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                           intermediate_size=64, vocab_size=300))
    llm = build_llm(cfg, tokenizer)
    users, items = torch.randn(n_users + 1, cf_dim), torch.randn(n_items + 1, cf_dim)
    return CKFModel(llm, users, items, tokenizer.convert_tokens_to_ids("<cf>"), 4,
                    CFConfig(dim=cf_dim, pooling=pooling), LoRAConfig(rank=4, alpha=8, dropout=0.0))


def _batch(tokenizer, n_rows=6, length=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    ph = tokenizer.convert_tokens_to_ids("<cf>")
    ids = torch.randint(5, 200, (n_rows, length), generator=g)
    n_targets = torch.tensor([1, 3, 1, 2, 1, 3][:n_rows])
    is_hybrid = torch.tensor([True, True, False, True, True, False][:n_rows])
    for r in range(n_rows):
        if is_hybrid[r]:
            pos = torch.randperm(length - 2, generator=g)[: int(n_targets[r]) + 1].sort().values + 1
            ids[r, pos] = ph
    history = torch.randint(0, 11, (n_rows, 4), generator=g)
    history[2, 2:] = -1
    history[4, :] = -1  # no history at all
    targets = torch.randint(0, 11, (n_rows, 3), generator=g)
    for r in range(n_rows):
        targets[r, int(n_targets[r]):] = -1
    return {"input_ids": ids, "n_targets": n_targets, "is_hybrid": is_hybrid,
            "user_ids": torch.tensor([0, 3, 6, 2, 9, 1][:n_rows]),  # 9 is unseen: fallback row
            "history": history, "targets": targets}


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_soft_token_injection_matches_per_sample_reference(tokenizer, pooling):
    model = _model(tokenizer, pooling=pooling).eval()
    b = _batch(tokenizer)
    got = model.embed_with_soft_tokens(b["input_ids"], b["n_targets"], b["user_ids"], b["history"], b["targets"],
                                       b["is_hybrid"])
    want = model.llm.get_input_embeddings()(b["input_ids"]).clone()
    ph = model.placeholder_id
    for r in range(b["input_ids"].shape[0]):
        if not b["is_hybrid"][r]:
            continue
        k = int(b["n_targets"][r])
        soft = model.soft_tokens(b["user_ids"][r:r + 1], b["history"][r:r + 1], b["targets"][r:r + 1, :k])[0]
        positions = (b["input_ids"][r] == ph).nonzero().flatten()
        for slot, p in enumerate(positions):
            want[r, p] = soft[slot]
    torch.testing.assert_close(got, want)


def test_placeholder_count_mismatch_names_rows(tokenizer):
    model = _model(tokenizer)
    b = _batch(tokenizer)
    b["n_targets"][1] = 2  # row 1 holds 4 placeholders, now expects 3
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model.embed_with_soft_tokens(b["input_ids"], b["n_targets"], b["user_ids"], b["history"], b["targets"],
                                     b["is_hybrid"])


def test_unseen_ids_take_the_fallback_row(tokenizer):
    model = _model(tokenizer, n_users=7)
    ids = torch.tensor([0, 6, 7, 100, -1])
    rows = model._lookup(model.user_table, ids)
    torch.testing.assert_close(rows[2:], model.user_table[-1].expand(3, -1))
    torch.testing.assert_close(rows[:2], model.user_table[[0, 6]])


def test_meta_network_personalises_the_user_vector(tokenizer):
    model = _model(tokenizer)
    u = torch.tensor([1, 1])
    hist = torch.tensor([[0, 1, 2, -1], [5, 6, 7, 8]])
    targ = torch.tensor([[3], [3]])
    tok = model.soft_tokens(u, hist, targ)
    assert not torch.allclose(tok[0, 0], tok[1, 0])  # same user, different history -> different W_u
    torch.testing.assert_close(tok[0, 1], tok[1, 1])  # items are not personalised


@pytest.mark.parametrize("shared,per_task", [(True, True), (True, False), (False, True)])
def test_multi_lora_layer_matches_per_row_loop_forward_and_grads(shared, per_task):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10).requires_grad_(False)  # the frozen base weight
    seg = TaskSegments()
    layer = MultiLoRALinear(base, seg, num_tasks=4, rank=3, alpha=6.0, dropout=0.0, shared=shared, per_task=per_task,
                            impl="torch")
    with torch.no_grad():
        for p in (layer.shared_b, layer.task_b):
            if p is not None:
                p.normal_()
    task_of_row = torch.tensor([0, 0, 2, 2, 2, 3])  # task 1 empty
    seg.set(segment_offsets(task_of_row, 4))
    x = torch.randn(6, 5, 12, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    gx = x.grad.clone()

    x2 = x.detach().clone().requires_grad_(True)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters() if p.requires_grad}
    tok_task = task_of_row.repeat_interleave(5)
    ref = multi_lora_linear_per_row(x2.reshape(-1, 12), base.weight, base.bias, params.get("shared_a"),
                                    params.get("shared_b"), params.get("task_a"), params.get("task_b"), tok_task,
                                    layer.scale, layer.scale).reshape(6, 5, 10)
    ref.backward(grad)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x2.grad, rtol=1e-5, atol=1e-5)
    for n in got:
        torch.testing.assert_close(got[n], params[n].grad, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None


def test_lora_b_starts_at_zero_so_model_equals_base(tokenizer):
    model = _model(tokenizer).eval()
    b = _batch(tokenizer)
    b["is_hybrid"][:] = False
    b["input_ids"][b["input_ids"] == model.placeholder_id] = 7
    model.segments.set(torch.tensor([0, 3, 3, 6, 6]))
    out = model.llm(input_ids=b["input_ids"]).logits
    for m in model.modules():
        if isinstance(m, MultiLoRALinear):
            for p in (m.task_a, m.shared_a):
                if p is not None:
                    assert p.abs().sum() > 0
    # Re-build the same LLM without LoRA: outputs are identical at init.
    plain = build_llm(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                                       intermediate_size=64, vocab_size=300)), tokenizer).eval()
    torch.testing.assert_close(out, plain(input_ids=b["input_ids"]).logits)


def test_forward_backward_trains_lora_and_mapping(tokenizer):
    model = _model(tokenizer).train()
    b = _batch(tokenizer)
    order = torch.tensor([0, 1, 2, 3, 4, 5])
    b["task_ids"] = torch.tensor([0, 0, 1, 1, 2, 3])[order]
    b["row_offsets"] = segment_offsets(b["task_ids"], 4)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, -3:] = b["input_ids"][:, -3:]
    b["labels"], b["attention_mask"] = labels, torch.ones_like(b["input_ids"])
    out = model(b, text_weight=0.3)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "meta_net" in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "task_b" in n)
    assert all(p.grad is None for p in model.llm.parameters() if not p.requires_grad)


def test_loss_on_answer_positions_equals_the_full_logits_loss(tokenizer):
    """forward runs the output head only where an answer token is predicted: same row losses, loss, first-answer
    logits and gradients as cross-entropy over the full [B, L, V] logits with ignored positions."""
    torch.manual_seed(0)
    model = _model(tokenizer).train()
    for layer in model.lora_layers:  # non-zero B so that the adapters change the output
        for name in ("shared_b", "task_b"):
            p = getattr(model.llm.get_submodule(layer), name)  # lora_layers holds qualified names
            if p is not None:
                torch.nn.init.normal_(p, std=0.05)
    b = _batch(tokenizer)
    b["task_ids"] = torch.tensor([0, 0, 1, 1, 2, 3])
    b["row_offsets"] = segment_offsets(b["task_ids"], 4)
    labels = torch.full_like(b["input_ids"], -100)
    for r, (start, stop) in enumerate([(-3, None), (-5, -2), (-1, None), (-4, -1), (-2, None), (-6, -3)]):
        labels[r, start:stop] = b["input_ids"][r, start:stop]  # answers of different lengths and positions
    b["labels"], b["attention_mask"] = labels, torch.ones_like(b["input_ids"])
    model.eval()  # no dropout: both passes see the same function
    out = model(b, text_weight=0.3)
    out["loss"].backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    embeds = model.embed_with_soft_tokens(b["input_ids"], b["n_targets"], b["user_ids"], b["history"],
                                          b["targets"], b["is_hybrid"])
    full = model.llm(inputs_embeds=embeds, attention_mask=b["attention_mask"]).logits  # [B, L, V]
    tok = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                            reduction="none").view(labels.shape[0], -1)
    row_ref = tok.sum(1) / (labels[:, 1:] != -100).sum(1)
    loss_ref = model.combine_losses(row_ref, b["task_ids"], b["is_hybrid"], 0.3, None)
    loss_ref.backward()
    first = (labels != -100).float().argmax(1)
    torch.testing.assert_close(out["row_loss"], row_ref.detach())
    torch.testing.assert_close(out["loss"], loss_ref)
    torch.testing.assert_close(out["answer_logits"], full[torch.arange(6), first - 1].detach())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got_grads[n], p.grad, msg=n)


def test_combine_losses_by_hand(tokenizer):
    model = _model(tokenizer)
    row_loss = torch.tensor([1.0, 3.0, 2.0, 4.0, 10.0])
    task = torch.tensor([0, 0, 1, 1, 2])
    hyb = torch.tensor([False, False, False, True, True])
    # text: task0 mean 2, task1 mean 2 -> 2 ; hybrid: task1 4, task2 10 -> 7 ; lam 0.25
    got = model.combine_losses(row_loss, task, hyb, 0.25, None)
    assert math.isclose(float(got), 0.25 * 2 + 0.75 * 7)
    w = torch.tensor([1.0, 3.0, 1.0, 1.0])  # task 1 weighs 3
    got = model.combine_losses(row_loss, task, hyb, 1.0, w)
    assert math.isclose(float(got), (1 * 2 + 3 * 2) / 4)


def test_curriculum_weight():
    S = 100
    lam = [curriculum_text_weight("sigmoid", s, S) for s in range(S + 1)]
    assert math.isclose(lam[0], 1 / (1 + math.exp(-8)), rel_tol=1e-9)
    assert math.isclose(lam[50], 0.5) and math.isclose(lam[100], 1 / (1 + math.exp(8)), rel_tol=1e-9)
    assert all(a > b for a, b in zip(lam, lam[1:]))
    assert curriculum_text_weight("constant", 3, S) == 0.5
    assert curriculum_text_weight("two_stage", 49, S) == 1.0 and curriculum_text_weight("two_stage", 50, S) == 0.0
    with pytest.raises(ValueError):
        curriculum_text_weight("cosine", 1, S)


def _routed_setup(tokenizer):
    b = _batch(tokenizer)
    b["task_ids"] = torch.tensor([0, 0, 1, 1, 2, 3])
    b["row_offsets"] = segment_offsets(b["task_ids"], 4)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, -3:] = b["input_ids"][:, -3:]
    b["labels"], b["attention_mask"] = labels, torch.ones_like(b["input_ids"])
    return b


def _grads(tokenizer, b, **kwargs):
    model = _model(tokenizer).train()
    torch.manual_seed(5)
    with torch.no_grad():  # non-zero B: the adapters shape the path from the soft tokens to the loss
        for layer in model.lora_layers:
            for name in ("shared_b", "task_b"):
                p = getattr(model.llm.get_submodule(layer), name)
                if p is not None:
                    p.normal_(std=0.1)
    model(b, **kwargs)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_spec_routing_text_loss_trains_loras_hybrid_loss_trains_mapping(tokenizer):
    """ckf_method.md section 3: with route_gradients the LoRAs' gradients are those of the text-only loss and the
    mapping side's those of the hybrid loss (which still flows back *through* the adapted LLM)."""
    b = _routed_setup(tokenizer)
    routed = _grads(tokenizer, b, text_weight=0.5, route_gradients=True)
    text_only = _grads(tokenizer, b, text_weight=1.0)  # loss = L_text
    hybrid_only = _grads(tokenizer, b, text_weight=0.0)  # loss = L_hybrid
    joint = _grads(tokenizer, b, text_weight=0.5)
    lora = [n for n in routed if "shared_" in n or "task_" in n]
    mapping = [n for n in routed if n not in lora]
    assert lora and mapping and any("meta_net" in n for n in mapping) and any("item_proj" in n for n in mapping)
    for n in lora:
        torch.testing.assert_close(routed[n], 0.5 * text_only[n], rtol=1e-5, atol=1e-7)
    for n in mapping:
        torch.testing.assert_close(routed[n], 0.5 * hybrid_only[n], rtol=1e-5, atol=1e-7)
        assert hybrid_only[n].abs().sum() > 0, n
    # ...and the routing changes something: without it, the hybrid rows train the LoRAs too.
    assert any(not torch.allclose(joint[n], routed[n]) for n in lora)
    assert any(hybrid_only[n].abs().sum() > 0 for n in lora)


@pytest.mark.parametrize("kind,extra", [("linear", 0), ("mlp", 32 * 32 + 32)])
def test_projector_kinds(tokenizer, kind, extra):
    from ckf_dist.model.ckf import build_projector

    proj = build_projector(kind, 4, 32)
    assert sum(p.numel() for p in proj.parameters()) == 4 * 32 + 32 + extra
    if kind == "linear":
        assert isinstance(proj, torch.nn.Linear)  # the spec: one linear layer d -> hidden
    with pytest.raises(ValueError, match="cf.projector"):
        build_projector("conv", 4, 32)


def test_answer_logits_at_the_scored_position(tokenizer):
    """batch["score_pos"][r] = k returns the logits predicting answer token k of row r (capped at the last)."""
    b = _routed_setup(tokenizer)
    model = _model(tokenizer).eval()
    with torch.no_grad():
        first = model(b)["answer_logits"]
        b["score_pos"] = torch.tensor([0, 1, 2, 5, 1, 0])
        picked = model(b)["answer_logits"]
        hidden = model.llm.get_decoder()(inputs_embeds=model.embed_with_soft_tokens(
            b["input_ids"], b["n_targets"], b["user_ids"], b["history"], b["targets"], b["is_hybrid"]),
            attention_mask=b["attention_mask"]).last_hidden_state
        full = model.llm.get_output_embeddings()(hidden)  # [B, L, V]
    length = b["input_ids"].shape[1]
    for r, k in enumerate([0, 1, 2, 2, 1, 0]):  # 3 answer tokens per row: k = 5 is capped at 2
        torch.testing.assert_close(picked[r], full[r, length - 4 + k])
    torch.testing.assert_close(first[3], full[3, length - 4])
