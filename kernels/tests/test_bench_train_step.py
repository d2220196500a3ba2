"""The training-step benchmark: its index-loop baseline is the same maths as impl="torch", and --tiny runs on CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

import ckf_dist.model.multi_lora as multi_lora_module
from ckf_dist.kernels import bench_train_step as bench
from ckf_dist.kernels import segment_offsets
from ckf_dist.model.multi_lora import MultiLoRALinear, TaskSegments
from ckf_dist.testing import assert_close_finite


def _fwd_bwd(layer, x, dy, seed):
    """y and the gradients {x, trainable params} of one forward + backward (dropout seeded with ``seed``)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(dy)
    grads = {"x": x.grad} | {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shared,per_task", [(True, True), (False, True), (True, False)])
def test_index_loop_layer_matches_torch_impl(monkeypatch, shared, per_task, dropout):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10).requires_grad_(False)
    segments = TaskSegments()
    layer = MultiLoRALinear(base, segments, num_tasks=4, rank=3, alpha=6.0, dropout=dropout, shared=shared,
                            per_task=per_task, impl="torch").train()
    with torch.no_grad():
        for b in (layer.shared_b, layer.task_b):
            if b is not None:
                b.normal_()  # B starts at 0: make the adapters count
    segments.set(segment_offsets(torch.tensor([0, 0, 2, 2, 2, 3]), 4))  # task 1 has no rows
    x, dy = torch.randn(6, 5, 12), torch.randn(6, 5, 10)

    y_ref, g_ref = _fwd_bwd(layer, x, dy, seed=7)
    assert bench.use_variant(layer, "index_loop") == 1
    assert type(layer) is bench.IndexLoopMultiLoRALinear

    def segment_path_called(*args, **kwargs):
        raise AssertionError("the index-loop baseline must not call the library's multi_lora_linear")

    monkeypatch.setattr(multi_lora_module, "multi_lora_linear", segment_path_called)
    y, g = _fwd_bwd(layer, x, dy, seed=7)
    monkeypatch.undo()

    assert_close_finite(y, y_ref, rtol=1e-5, atol=1e-5, name="y")
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_close_finite(g[name], g_ref[name], rtol=1e-5, atol=1e-5, name=f"gradient of {name}")

    bench.use_variant(layer, "torch")  # and back: the library layer again
    assert type(layer) is MultiLoRALinear and layer.impl == "torch"
    assert_close_finite(_fwd_bwd(layer, x, dy, seed=7)[0], y_ref, rtol=0, atol=0, name="y (back to torch)")


def test_synthetic_batch_is_collated_like():
    shape = bench.TINY_CPU
    b = bench.make_synthetic_batch(shape, "cpu")
    B, L = shape.rows, shape.seq_len
    assert b["input_ids"].shape == b["labels"].shape == (B, L)
    assert torch.all(b["task_ids"][1:] >= b["task_ids"][:-1])
    assert_close_finite(b["row_offsets"], segment_offsets(b["task_ids"], shape.num_tasks), rtol=0, atol=0,
                        name="row_offsets")
    n_placeholders = (b["input_ids"] == shape.vocab_size).sum(1)
    assert_close_finite(n_placeholders, torch.where(b["is_hybrid"], b["n_targets"] + 1, 0), rtol=0, atol=0,
                        name="placeholders per row")
    assert b["is_hybrid"].any() and (~b["is_hybrid"]).any()
    labelled = b["labels"] != bench.IGNORE
    assert labelled[:, -shape.answer_len:].all() and not labelled[:, :-shape.answer_len].any()
    assert ((b["targets"] >= 0).sum(1) == b["n_targets"]).all()


def test_tiny_run_times_each_variant_and_losses_agree(tmp_path, capsys):
    out_file = tmp_path / "step.json"
    result = bench.main(["--tiny", "--warmup", "1", "--steps", "2", "--json", str(out_file)])
    printed = capsys.readouterr().out
    assert "NOT the target measurement" in printed
    written = json.loads(out_file.read_text())
    for res in (result, written):
        assert set(res["variants"]) == {"index_loop", "torch"}
        for name, v in res["variants"].items():
            assert "error" not in v, v
            assert v["label"] in printed and v["ms_median"] > 0 and v["tokens_per_s"] > 0
            assert math.isfinite(v["loss"])
            assert v["speedup_vs_index_loop"] > 0 and v["speedup_vs_torch"] > 0
        assert res["max_loss_rel_diff"] < 1e-5 and res["max_grad_rel_diff"] < 1e-4
    assert "max relative loss difference" in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dropout", ["0", "0.1"])
def test_1b_step_all_variants_gpu(tmp_path, dropout):
    """The real 1.1B shape in bf16, LoRA dropout off and on (fused in the Triton variants): every variant runs
    and the first-step losses/gradients (checked without dropout) agree."""
    result = bench.main(["--warmup", "1", "--steps", "2", "--dropout", dropout, "--json", str(tmp_path / "step.json")])
    assert result["dropout"] == float(dropout)
    assert result["llm_params"] > 1_000_000_000
    assert set(result["variants"]) == {"index_loop", "torch", "triton", "side"}
    for v in result["variants"].values():
        assert "error" not in v, v
    # bf16 through 22 layers: loose bounds (the index loop, torch and triton round differently).
    assert result["max_loss_rel_diff"] < 1e-2 and result["max_grad_rel_diff"] < 5e-2
