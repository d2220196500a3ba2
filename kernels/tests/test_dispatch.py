"""impl="auto" rules (``dispatch.choose_impl``, a pure function: tested without CUDA) and the win table built
from the benchmark's --json output."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ckf_dist.kernels import multi_lora_linear, multi_lora_linear_reference, resolve_impl
from ckf_dist.kernels.dispatch import (SIDE, TORCH, TRITON, build_win_table, choose_impl, table_fuse_shrink,
                                       write_win_table)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
GPU = "NVIDIA H100 80GB HBM3"
# (device, dtype, tokens, d_in, d_out, r0, r, T) of a shape the fused path could take but for the table.
OK = dict(device_type="cuda", x_dtype=BF16, w_dtype=BF16, n_rows=16384, d_in=4096, d_out=4096, r0=16, r1=16,
          num_tasks=4, device_name=GPU)


def win_row(fused_ms, side_ms, **kw):
    row = dict(device=GPU, dtype="bf16", tokens=16384, d_in=4096, d_out=4096, r_pad=32, tasks=4,
               fused_ms=fused_ms, side_ms=side_ms)
    return row | kw


@pytest.mark.parametrize("change, impl, reason", [
    (dict(device_type="cpu"), TORCH, "need CUDA"),
    (dict(x_dtype=FP32, w_dtype=FP32), TORCH, "bf16/fp16 only"),
    (dict(x_dtype=BF16, w_dtype=FP16), TORCH, "x is bf16 but W is fp16"),
    (dict(x_dtype=FP32, w_dtype=BF16), TORCH, "x is fp32 but W is bf16"),
    (dict(r0=0, r1=0), TORCH, "no adapter"),
    (dict(r0=64, r1=72), TORCH, "rank"),
    (dict(num_tasks=17), TORCH, "17 tasks"),
    (dict(d_in=4100), SIDE, "multiples of 8"),
    (dict(d_out=1001), SIDE, "multiples of 8"),
    (dict(n_rows=1000), SIDE, "tokens"),
    (dict(table=[]), SIDE, "no measured win"),  # empty table: never the fused path
    (dict(), TRITON, "win table"),
])
def test_choose_impl_rules(change, impl, reason):
    """Each rule alone turns a shape the (winning) table would send to the fused path elsewhere."""
    got, why = choose_impl(**(OK | dict(table=[win_row(1.0, 2.0)]) | change))
    assert got == impl and reason in why, (got, why)


def test_choose_impl_fused_only_on_a_measured_win_for_this_gpu_and_shape():
    table = [win_row(1.0, 1.2)]
    assert choose_impl(**OK, table=table)[0] == TRITON
    assert choose_impl(**(OK | dict(x_dtype=FP16, w_dtype=FP16)), table=table)[0] == SIDE   # bf16 row only
    assert choose_impl(**(OK | dict(device_name="NVIDIA A100")), table=table)[0] == SIDE    # other GPU
    assert choose_impl(**(OK | dict(num_tasks=8)), table=table)[0] == SIDE                  # other T
    assert choose_impl(**(OK | dict(r0=8, r1=8)), table=table)[0] == SIDE                   # r_pad 16 != 32
    assert choose_impl(**(OK | dict(r0=10, r1=12)), table=table)[0] == TRITON               # r_pad 32 too
    assert choose_impl(**(OK | dict(n_rows=9000)), table=table)[0] == TRITON                # within 2x
    assert choose_impl(**(OK | dict(n_rows=4096)), table=table)[0] == SIDE                  # 4x fewer tokens
    assert choose_impl(**OK, table=[win_row(1.3, 1.2)])[0] == SIDE                          # measured loss
    # The nearest token count decides: a loss at 16384 outweighs a win at 32768 for 16384 tokens.
    assert choose_impl(**OK, table=[win_row(1.0, 1.2, tokens=32768), win_row(1.3, 1.2)])[0] == SIDE


def test_shipped_table_is_well_formed_and_auto_never_fuses_without_it():
    from ckf_dist.kernels.win_table import WIN_TABLE

    keys = {"device", "dtype", "tokens", "d_in", "d_out", "r_pad", "tasks", "fused_ms", "side_ms", "fuse_shrink"}
    assert all(set(row) == keys for row in WIN_TABLE)
    if not WIN_TABLE:
        assert choose_impl(**OK)[0] == SIDE


def test_auto_on_cpu_runs_the_reference_and_resolves_explicit_impls(kt):
    case = kt.Case([3, 4], 8, 8, 2, 2)
    assert resolve_impl("auto", case.x, case.weight, case.shared_a, case.task_a) == TORCH
    assert resolve_impl("side", case.x, case.weight, case.shared_a, case.task_a) == SIDE
    with pytest.raises(ValueError, match="impl="):
        resolve_impl("fast", case.x, case.weight, case.shared_a, case.task_a)
    kt.close(multi_lora_linear(*case.args()), multi_lora_linear_reference(*case.args()), rtol=0, atol=0, name="y")


def test_torch_path_dropout_is_torch_dropout(kt):
    """impl="torch" with lora_dropout: the LoRA input is F.dropout(x) (same RNG stream as nn.Dropout)."""
    case = kt.Case([3, 4], 8, 8, 2, 2)
    torch.manual_seed(5)
    y = multi_lora_linear(*case.args(), impl="torch", lora_dropout=0.5)
    torch.manual_seed(5)
    lx = torch.nn.functional.dropout(case.x, 0.5, training=True)
    kt.close(y, multi_lora_linear_reference(*case.args(), lora_x=lx), rtol=0, atol=0, name="y")


def test_win_table_from_benchmark_json(tmp_path):
    """The benchmark's --json rows -> win-table rows (fastest fused variant vs the side path) -> a win_table.py
    module that imports and drives choose_impl."""
    common = dict(device=GPU, dtype="bf16", d_in=4096, d_out=4096, r_pad=32, tasks=4)
    rows = []
    for tokens, fused, sep, side in ((16384, 1.10, 1.05, 1.20), (4096, 0.40, 0.42, 0.35)):
        for method, ms in (("base linear", 1.0), ("triton fused", fused), ("triton separate", sep),
                           ("triton side", side), ("torch reference", 3.0)):
            rows.append(common | dict(tokens=tokens, method=method, median_ms=ms))
    rows.append(common | dict(tokens=8192, method="triton fused", median_ms=0.5))  # no side timing: skipped
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(dict(gpu=GPU, torch="2.11", triton="3.6", date="2026-11-27", rows=rows)))
    table = build_win_table(rows)
    assert [(r["tokens"], r["fused_ms"], r["side_ms"], r["fuse_shrink"]) for r in table] == [
        (4096, 0.40, 0.35, True), (16384, 1.05, 1.20, False)]
    args = (GPU, BF16, 16384, 4096, 4096, 16, 16, 4)
    assert table_fuse_shrink(table, *args) is False and table_fuse_shrink(table, *args[:2], 4096, *args[3:]) is True
    assert table_fuse_shrink(table, "NVIDIA A100", *args[1:]) is None  # no row: the width rule decides
    out = tmp_path / "win_table.py"
    assert write_win_table(str(bench), str(out)) == table
    spec = importlib.util.spec_from_file_location("wt", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.WIN_TABLE == table
    assert choose_impl(**OK, table=mod.WIN_TABLE)[0] == TRITON
    assert choose_impl(**(OK | dict(n_rows=4096)), table=mod.WIN_TABLE)[0] == SIDE
    from ckf_dist.kernels import build_win_table as cli

    cli.main([str(bench), str(tmp_path / "again.py")])
    assert (tmp_path / "again.py").read_text() == out.read_text()


def test_task_segments_validate_once_per_batch():
    """The model's TaskSegments validates the token offsets against the layer's token count when it first
    builds them (the layers then skip the kernels' per-call check)."""
    from ckf_dist.model.multi_lora import TaskSegments

    seg = TaskSegments()
    seg.set(torch.tensor([0, 2, 3]))
    assert seg.token_offsets(4, n_tokens=12).tolist() == [0, 8, 12]
    seg.set(torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match="end at the row count 16"):
        seg.token_offsets(4, n_tokens=16)


def test_task_segments_tile_list_is_built_once_per_batch():
    from ckf_dist.kernels.multi_lora_triton import build_tile_list
    from ckf_dist.model.multi_lora import TaskSegments

    seg = TaskSegments()
    seg.set(torch.tensor([0, 2, 3]))
    tiles = seg.tile_list(4, n_tokens=12)
    assert seg.tile_list(4, n_tokens=12) is tiles                      # shared by every layer of the batch
    assert torch.equal(tiles, build_tile_list(torch.tensor([0, 8, 12]), 12))
    seg.set(torch.tensor([0, 1, 3]))
    assert not torch.equal(seg.tile_list(4, n_tokens=12), tiles)       # a new batch, a new list


def test_model_layer_hands_dropout_and_segments_to_the_kernels(kt):
    """ckf_dist.model's MultiLoRALinear on the Triton path (interpreter): eval output equals the torch path;
    in training its dropout probability reaches the fused kernels (seeded from torch's CPU generator, so a
    reseed replays it) and the per-batch offsets are validated against the layer's token count."""
    from ckf_dist.kernels.multi_lora_triton import dropout_keep_mask
    from ckf_dist.model.multi_lora import MultiLoRALinear, TaskSegments

    torch.manual_seed(0)
    segments = TaskSegments()
    layer = MultiLoRALinear(torch.nn.Linear(16, 12), segments, num_tasks=2, rank=2, alpha=4.0, dropout=0.25,
                            shared=True, per_task=True, impl="triton")
    with torch.no_grad():
        layer.shared_b.normal_()
        layer.task_b.normal_()
    x = torch.randn(3, 4, 16)
    segments.set(torch.tensor([0, 1, 3]))
    layer.eval()
    y = layer(x)
    layer.impl = "torch"
    assert kt.within(kt.rel_err(y, layer(x)), 1e-6)
    layer.impl = "triton"
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    keep = dropout_keep_mask(seed, 12, 16, 0.25, "cpu")
    flat = x.reshape(12, 16)
    ref = multi_lora_linear_reference(flat, layer.weight, layer.bias, layer.shared_a, layer.shared_b, layer.task_a,
                                      layer.task_b, torch.tensor([0, 4, 12]), 2.0, 2.0, lora_x=flat * keep / 0.75)
    assert kt.within(kt.rel_err(y1.reshape(12, 12), ref), 1e-6)
    y1.sum().backward()
    assert layer.task_a.grad is not None and bool(torch.isfinite(layer.task_a.grad).all())
    segments.set(torch.tensor([0, 1, 2]))  # 2 rows of offsets for a 3-row batch
    with pytest.raises(ValueError, match="end at the row count 12"):
        layer(x)
