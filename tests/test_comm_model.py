"""benchmarks/comm_model.py: the parameter list matches a real CKFModel, the per-step volumes match a hand
computation on a tiny shape, and the command line rejects bad keys and options."""
import importlib.util
import pathlib

import pytest
import torch

from ckf_dist.config import ConfigError, load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("comm_model", REPO / "benchmarks" / "comm_model.py")
cm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cm)


@pytest.mark.parametrize("extra", [
    [],
    ["cf.pooling=attention", "cf.projector=mlp", "lora.task_targets=[q_proj,v_proj]", "lora.rank=3"],
])
def test_parameter_list_matches_a_real_ckf_model(extra):
    from ckf_dist.model.llm import build_tiny_tokenizer
    from ckf_dist.worker import build_ckf_model

    cfg = load_config(["model.tiny.hidden_size=16", "model.tiny.num_layers=2", "model.tiny.num_heads=4",
                       "model.tiny.num_kv_heads=2", "model.tiny.intermediate_size=24", "cf.dim=3",
                       "model.tiny.pretrain_steps=0", *extra])
    tok = build_tiny_tokenizer(["a tiny vocabulary for the test", "Yes", "No"], vocab_size=300)
    model = build_ckf_model(cfg, tok, torch.zeros(5, 3), torch.zeros(6, 3))
    t = cfg.model.tiny
    shape = cm.Shape(t.hidden_size, t.num_layers, t.intermediate_size, len(tok), t.num_heads, t.num_kv_heads)
    got = sorted((n, tr) for _, n, tr in cm.param_tensors(shape, cfg))
    want = sorted((p.numel(), p.requires_grad) for p in model.parameters())
    assert got == want


def test_volumes_match_a_hand_computation():
    """hidden 8, 1 layer, intermediate 16, vocab 10, 2 heads of 4, 1 KV head (k/v: 8 -> 4); LoRA rank 2, shared on
    k/v/o, per task (5 tasks: ckf_dist.data.schema.TASK_IDS) on q; cf.dim 2, meta_hidden 3, linear projectors,
    mean pooling.

    Frozen tensors: embed 80, lm_head 80, norm 8, 2 layer norms 8 + 8, q 64, k 32, v 32, o 64, gate/up/down 128 each.
    Trainable: k/v shared A 2x8 = 16, B 4x2 = 8 (each); o shared A 16, B 16; q task A 6x2x8 = 96, B 6x8x2 = 96 (6 task slots);
    meta-net 2x3 + 3 + 3x4 + 4 = 25; two projectors 2x8 + 8 = 24 each -> 345 trainable.
    Persistence threshold 50: partitioned = embed, lm_head, q, o, gate, up, down (672 frozen) + task A, B (192).
    4 GPUs, bf16: all-gather = 2 (fwd + bwd) x 3/4 x (672 + 192) x 2 B = 2592 B; grad reduce-scatter = 3/4 x 345 x 2
    = 517.5 B, and as much for the updated trainable partitions' all-gather.
    """
    cfg = load_config(["lora.rank=2", "lora.shared_targets=[k_proj,v_proj,o_proj]", "lora.task_targets=[q_proj]",
                       "cf.dim=2", "cf.meta_hidden=3", "cf.pooling=mean", "cf.projector=linear"])
    shape = cm.Shape(hidden=8, layers=1, intermediate=16, vocab=10, heads=2, kv_heads=1)
    tensors = cm.param_tensors(shape, cfg)
    assert sum(n for _, n, t in tensors if not t) == 80 + 80 + 8 + 16 + 64 + 32 + 32 + 64 + 3 * 128
    v3 = cm.step_volumes(tensors, n_gpus=4, zero_stage=3, persistence_threshold=50, bytes_per_param=2)
    assert cm.NUM_TASKS == 6
    assert v3["trainable_params"] == 345 and v3["partitioned_frozen_params"] == 672
    assert v3["partitioned_trainable_params"] == 192
    assert v3["param_allgather"] == pytest.approx(2592.0)
    assert v3["grad_reduce_scatter"] == pytest.approx(517.5) and v3["trainable_allgather"] == pytest.approx(517.5)
    v2 = cm.step_volumes(tensors, n_gpus=4, zero_stage=2, persistence_threshold=50, bytes_per_param=2)
    assert v2["param_allgather"] == 0 and v2["grad_reduce_scatter"] == pytest.approx(517.5)
    assert cm.step_volumes(tensors, 1, 3, 50, 2)["param_allgather"] == 0  # one GPU: nothing moves


def test_llama7b_config_prints_the_table(capsys):
    assert cm.main(["--config", str(REPO / "configs" / "llama7b_8xa100_zero3.yaml")]) == 0
    out = capsys.readouterr().out
    assert "a model, not a measurement" in out and "'hidden': 4096" in out and "'vocab': 32001" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 1x8 ") or ln.startswith("| 8x8 ")]
    assert len(rows) == 2 and "NVLink" in rows[0] and "InfiniBand" in rows[1]
    for key in ("mfu=", "overlap=", "nvlink_gbs=", "nic_gbps=", "link_efficiency=", "peak_tflops="):
        assert key in out
    # 7B: ~6.74B frozen parameters partitioned, gathered twice in bf16 -> ~23.6 GB per GPU on 8 GPUs
    args, cfg, shape, a = cm.parse_args(["--config", str(REPO / "configs" / "llama7b_8xa100_zero3.yaml")])
    row = cm.scenario(shape, cfg, a, 1, 8)
    assert row["param_allgather"] == pytest.approx(
        2 * 7 / 8 * (row["partitioned_frozen_params"] + row["partitioned_trainable_params"]) * 2)
    assert 6.6e9 < row["partitioned_frozen_params"] < 6.8e9
    assert cm.scenario(shape, cfg, a, 8, 8)["scaling_efficiency"] < row["scaling_efficiency"] <= 1.0


def test_parse_args_rejects_bad_keys_and_options():
    with pytest.raises(ConfigError, match="training.no_such_key"):
        cm.parse_args(["training.no_such_key=1"])
    with pytest.raises(SystemExit):
        cm.parse_args(["--no-such-option", "1"])
    with pytest.raises(SystemExit):
        cm.parse_args(["--layout", "8by8"])
    with pytest.raises(ConfigError, match="shape unknown"):
        cm.parse_args(["model.source=hf", "model.path=/nowhere/some-model"])
    args, cfg, shape, _ = cm.parse_args(["model.source=hf", "model.path=/nowhere/some-model", "--hidden", "64",
                                         "--layers", "2", "--intermediate", "128", "--vocab", "100", "--heads", "4",
                                         "--kv-heads", "4", "deepspeed.zero_stage=2"])
    assert args.overrides == ["model.source=hf", "model.path=/nowhere/some-model", "deepspeed.zero_stage=2"]
    assert shape.hidden == 64 and cfg.deepspeed.zero_stage == 2
