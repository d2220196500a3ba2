"""Padding-free packing (ckf_dist.data.packing): the packer's layout, and packed == padded for the model's loss,
per-sample losses, answer logits and the gradients of every trainable parameter (fp32, tight tolerance)."""
import numpy as np
import pytest
import torch

from ckf_dist.config import CFConfig, ConfigError, LoRAConfig, ModelConfig, TinyModelConfig, load_config
from ckf_dist.data.collate import IGNORE, collate_prompts
from ckf_dist.data.packing import first_fit_decreasing, pack_batch, token_counts
from ckf_dist.model.ckf import CKFModel
from ckf_dist.model.llm import build_llm, build_tiny_tokenizer

TEXTS = ["The user liked red comet; blue river. Will the user enjoy green hill? Answer Yes or No.",
         "Yes", "No", "1", "2", "3", "4", "5", "How will the user rate dark noir 17? Answer 1 to 5."] * 10
N_TASKS, N_USERS, N_ITEMS, PAD = 4, 7, 11, 0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TEXTS, vocab_size=300)


def _samples(ph: int, n: int = 13, seed: int = 0) -> dict:
    """Tokenised sample columns as ``streaming.tokenize_batch`` yields them: prompts of very different lengths
    (top-K-like long ones, CTR-like short ones), hybrid prompts with 1 + n_targets placeholders."""
    rng = np.random.default_rng(seed)
    col = lambda: np.empty(n, dtype=object)  # noqa: E731
    text, hyb, ans, hist, targ = col(), col(), col(), col(), col()
    tasks = rng.integers(0, N_TASKS - 1, size=n)  # task 3 absent: an empty Multi-LoRA segment
    for i in range(n):
        k = int(rng.integers(1, 4))
        words = rng.integers(5, 200, size=int(rng.integers(3, 40)))
        words[words == ph] = 6
        text[i] = np.concatenate([[1], words])  # BOS-like first token
        h = np.concatenate([[1], words, [ph] * (1 + k)])
        rng.shuffle(h[1:])
        hyb[i] = h
        ans[i] = rng.integers(5, 200, size=int(rng.integers(1, 4)))
        hist[i] = rng.integers(0, N_ITEMS + 2, size=int(rng.integers(0, 5)))  # N_ITEMS+1: unseen -> fallback
        targ[i] = rng.integers(0, N_ITEMS, size=k)
    return {"task_id": tasks.astype(np.int8), "user_id": rng.integers(0, N_USERS + 2, size=n),
            "label": rng.random(n).astype(np.float32), "text_prompt_ids": text, "hybrid_prompt_ids": hyb,
            "answer_ids": ans, "history_item_ids": hist, "target_item_ids": targ}


def _model(tokenizer, attn: str = "sdpa", seed: int = 0, hidden: int = 32) -> CKFModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(attn_implementation=attn,
                      tiny=TinyModelConfig(hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                                           intermediate_size=2 * hidden, vocab_size=300))
    llm = build_llm(cfg, tokenizer)
    model = CKFModel(llm, torch.randn(N_USERS + 1, 4), torch.randn(N_ITEMS + 1, 4),
                     tokenizer.convert_tokens_to_ids("<cf>"), N_TASKS, CFConfig(dim=4),
                     LoRAConfig(rank=4, alpha=8, dropout=0.0))
    for layer in model.lora_layers:  # non-zero B: the adapters (and their routing) change the output
        for name in ("shared_b", "task_b"):
            p = getattr(model.llm.get_submodule(layer), name)  # lora_layers holds qualified names
            if p is not None:
                torch.nn.init.normal_(p, std=0.05)
    return model


def _run(model, batch, **kw):
    model.zero_grad()
    out = model(batch, **kw)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


# ------------------------------------------------------------------------------------------------ packer
@pytest.mark.parametrize("seed,budget", [(0, 48), (1, 64), (2, 100), (3, 400)])
def test_packer_keeps_every_sample_once_whole_and_grouped(tokenizer, seed, budget):
    ph = tokenizer.convert_tokens_to_ids("<cf>")
    padded = collate_prompts(_samples(ph, n=15, seed=seed), PAD, N_TASKS)
    packed = pack_batch(padded, budget, PAD, N_TASKS)
    seq, ids, lab, pos = packed["seq_ids"], packed["input_ids"], packed["labels"], packed["position_ids"]
    n_rows, width = ids.shape
    lengths = padded["attention_mask"].sum(1)
    assert width <= budget and width == int((seq >= 0).sum(1).max())
    assert n_rows < padded["input_ids"].shape[0]  # several samples share rows: the test is not vacuous
    seen, mixed_forms = [], 0
    for r in range(n_rows):
        real = seq[r] >= 0
        n_real = int(real.sum())
        assert bool(real[:n_real].all()) and not bool(real[n_real:].any())  # padding only at the tail
        assert torch.all(ids[r, n_real:] == PAD) and torch.all(lab[r, n_real:] == IGNORE)
        assert torch.equal(pos[r, n_real:], torch.arange(width - n_real))
        row_samples = torch.unique_consecutive(seq[r, :n_real])
        for s in row_samples.tolist():
            at = (seq[r] == s).nonzero().flatten()
            n = int(lengths[s])
            assert at.numel() == n and int(at[-1] - at[0]) == n - 1  # never split, contiguous
            assert torch.equal(ids[r, at], padded["input_ids"][s, :n])
            assert torch.equal(lab[r, at], padded["labels"][s, :n])
            assert torch.equal(pos[r, at], torch.arange(n))  # positions restart per sample
        # one task per packed row, and the row's recorded task is theirs
        assert set(padded["task_ids"][row_samples].tolist()) == {int(packed["row_task_ids"][r])}
        mixed_forms += len(set(padded["is_hybrid"][row_samples].tolist())) > 1
        seen += row_samples.tolist()
    assert sorted(seen) == list(range(padded["input_ids"].shape[0]))  # every sample exactly once
    if budget >= 100:
        assert mixed_forms  # text and hybrid samples of a task share rows (routing is per token)
    tasks, off = packed["row_task_ids"], packed["row_offsets"]
    assert torch.all(tasks[1:] >= tasks[:-1]) and off.numel() == N_TASKS + 1 and int(off[-1]) == n_rows
    for t in range(N_TASKS):
        assert torch.all(tasks[off[t]:off[t + 1]] == t)
    for key in ("task_ids", "is_hybrid", "user_ids", "n_targets", "history", "targets", "label", "sample_index"):
        assert packed[key] is padded[key]  # per-sample columns untouched
    assert token_counts(packed)[0] == token_counts(padded)[0] == int(lengths.sum())
    assert token_counts(packed)[1] < token_counts(padded)[1]  # never more: the padded width is a candidate


def test_the_training_collate_function_packs_when_asked(tokenizer):
    from ckf_dist.data.collate import prompt_collate_fn

    ph = tokenizer.convert_tokens_to_ids("<cf>")
    cols = _samples(ph)
    got = prompt_collate_fn(PAD, N_TASKS, pack_tokens=64)(cols)
    want = pack_batch(collate_prompts(cols, PAD, N_TASKS), 64, PAD, N_TASKS)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "seq_ids" not in prompt_collate_fn(PAD, N_TASKS)(cols)  # pack_tokens=0: padded


def test_first_fit_decreasing_is_tight_and_respects_groups():
    lengths = np.array([5, 3, 2, 4, 1, 5, 5])
    groups = np.array([0, 0, 0, 0, 0, 1, 1])
    bins = first_fit_decreasing(lengths, groups, budget=5)
    assert bins == [[0], [3, 4], [1, 2], [5], [6]]  # 15 tokens of group 0 in 3 bins of 5: optimal
    assert first_fit_decreasing(np.array([1, 1, 1]), np.array([2, 0, 2]), budget=10) == [[1], [0, 2]]


def test_sample_longer_than_the_budget_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"batch row 1 has 9 tokens, more than training.pack_tokens=8"):
        first_fit_decreasing(np.array([3, 9, 2]), np.zeros(3, dtype=int), budget=8)


def test_config_requires_a_budget_that_holds_the_longest_sample():
    cfg = load_config(["training.packing=true", "data.max_seq_len=128"])
    assert cfg.training.pack_tokens == 0  # 0 = data.max_seq_len
    load_config(["training.packing=true", "training.pack_tokens=512", "data.max_seq_len=128"])
    with pytest.raises(ConfigError, match=r"training.pack_tokens=100 .* data.max_seq_len=128"):
        load_config(["training.packing=true", "training.pack_tokens=100", "data.max_seq_len=128"])


# --------------------------------------------------------------------------------- packed == padded
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("route", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_ones(tokenizer, attn, route):
    model = _model(tokenizer, attn).train()  # train(): gradient routing is active; no dropout anywhere
    ph = tokenizer.convert_tokens_to_ids("<cf>")
    padded = collate_prompts(_samples(ph), PAD, N_TASKS)
    packed = pack_batch(padded, 64, PAD, N_TASKS)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    forms_per_row = [len(set(padded["is_hybrid"][s[s >= 0]].tolist())) for s in packed["seq_ids"]]
    assert max(forms_per_row) == 2  # a row holding both forms: gradient routing must go per token
    kw = dict(text_weight=0.3, task_weights=torch.tensor([1.0, 2.0, 0.5, 1.0]), route_gradients=route)
    want, want_g = _run(model, padded, **kw)
    got, got_g = _run(model, packed, **kw)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss"], want["loss"], **tol)
    torch.testing.assert_close(got["row_loss"], want["row_loss"], **tol)
    torch.testing.assert_close(got["answer_logits"], want["answer_logits"], **tol)
    assert want_g.keys() == got_g.keys() and len(want_g) > 0
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for n, g in got_g.items() if "meta_net" in n)
    assert any(g.abs().sum() > 0 for n, g in got_g.items() if "task_a" in n)


def test_packed_equals_padded_with_gradient_checkpointing(tokenizer):
    """Reentrant checkpointing, as the 7B config runs: the recomputed layers get the same position ids."""
    model = _model(tokenizer).train()
    ph = tokenizer.convert_tokens_to_ids("<cf>")
    padded = collate_prompts(_samples(ph), PAD, N_TASKS)
    want, want_g = _run(model, padded, text_weight=0.3)
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.llm.enable_input_require_grads()
    got, got_g = _run(model, pack_batch(padded, 64, PAD, N_TASKS), text_weight=0.3)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=1e-6)


def test_attention_across_samples_would_change_the_loss(tokenizer):
    """The check above can fail: with positions running on through a packed row (one long sequence, so
    samples attend to the samples before them), the per-sample losses differ from the padded ones."""
    model = _model(tokenizer).eval()
    ph = tokenizer.convert_tokens_to_ids("<cf>")
    padded = collate_prompts(_samples(ph), PAD, N_TASKS)
    packed = pack_batch(padded, 64, PAD, N_TASKS)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    with torch.no_grad():
        want, got = model(padded)["row_loss"], model(leaky)["row_loss"]
    # samples that start a row see nothing before them; every later sample's loss moves
    starts = {int(packed["seq_ids"][r, 0]) for r in range(packed["seq_ids"].shape[0])}
    later = [s for s in range(want.numel()) if s not in starts]
    assert later and all(abs(float(got[s] - want[s])) > 1e-4 for s in later)
    torch.testing.assert_close(got[sorted(starts)], want[sorted(starts)], rtol=1e-5, atol=1e-6)


def test_placeholder_mismatch_in_a_packed_batch_names_the_sample(tokenizer):
    model = _model(tokenizer)
    ph = tokenizer.convert_tokens_to_ids("<cf>")
    padded = collate_prompts(_samples(ph), PAD, N_TASKS)
    packed = pack_batch(padded, 64, PAD, N_TASKS)
    hybrid_row = int(padded["is_hybrid"].nonzero()[0])
    packed["n_targets"] = packed["n_targets"].clone()
    packed["n_targets"][hybrid_row] += 1
    with pytest.raises(ValueError, match=rf"rows \[{hybrid_row}\]"):
        model(packed)


def test_flex_attention_falls_back_to_sdpa_without_cuda(caplog, monkeypatch):
    """torch 2.13's FlexAttention has no backward on CPU: the loader takes sdpa (same packed batches) and says why."""
    import logging

    from ckf_dist.model import llm

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: flex_attention really runs")
    monkeypatch.setattr(llm, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="ckf_dist.model.llm"):
        assert llm.resolve_attn_implementation("flex_attention") == "sdpa"
    (warning,) = [r.getMessage() for r in caplog.records if "flex_attention" in r.getMessage()]
    assert "no backward on CPU" in warning and "using sdpa" in warning
    assert load_config(["model.attn_implementation=flex_attention"]).model.attn_implementation == "flex_attention"


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_packed_equals_padded_on_gpu(tokenizer, attn):
    """The GPU attention paths: FlexAttention with the document BlockMask transformers builds from the position
    ids, flash-attn varlen (``cu_seq_lens``) where the package is installed. bf16 for flash (it has no fp32)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    ph = tokenizer.convert_tokens_to_ids("<cf>")
    padded = collate_prompts(_samples(ph), PAD, N_TASKS)
    packed = pack_batch(padded, 64, PAD, N_TASKS)
    dev = torch.device("cuda")
    results = []
    for name, batch in (("sdpa", padded), (attn, packed)):
        model = _model(tokenizer, name, hidden=128).to(dev, dtype).train()  # head_dim 32 for the GPU kernels
        assert model.llm.config._attn_implementation == name
        out, grads = _run(model, {k: v.to(dev) for k, v in batch.items()}, text_weight=0.3)
        results.append((out, grads))
    (want, want_g), (got, got_g) = results
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got["row_loss"], want["row_loss"], **tol)
    for name in want_g:
        torch.testing.assert_close(got_g[name].float(), want_g[name].float(), **tol)


def test_packing_benchmark_runs_on_a_small_data_set(tmp_path):
    """benchmarks/bench_packing.py end to end (prepare, tokenise, padded and packed steps) on a tiny data set."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_packing.py"
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--steps", "2", "--warmup", "0", "--out", str(out), f"data.path={tmp_path}/data",
                       "data.num_users=40", "data.num_items=30", "data.interactions_per_user=10",
                       "training.batch_size=8"]) == 0
    res = json.loads(out.read_text())
    assert res["steps"] == 2 and res["max_abs_loss_diff"] < 1e-4
    assert res["packed"]["real"] == res["padded"]["real"] and res["packed"]["computed"] <= res["padded"]["computed"]
