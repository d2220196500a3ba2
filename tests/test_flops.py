"""The MFU's FLOP count (ckf_dist.flops) against a hand count on a tiny LLaMA-shaped CKF model, the batch counts
of a padded and a packed batch, the peak table, and the profile report's arithmetic (ckf_dist.profile)."""
import pytest
import torch

from ckf_dist.data.collate import IGNORE
from ckf_dist.flops import ModelShape, model_shape, step_counts, step_flops, table_peak_tflops
from ckf_dist.kernels.bench_train_step import BenchShape, build_bench_model

# hidden 8, 1 layer, 2 query heads of 4 (h_q = 8), 1 kv head (k, v: 8 -> 4), MLP 16, vocab 10 + <cf>, LoRA rank 2
# (LoRAConfig's placement: shared on k, v, o; per task on q), CF d = 4 (meta-network 4 -> 32 -> 16).
HAND = BenchShape(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16, vocab_size=10,
                  rows=2, seq_len=8, rank=2, num_tasks=2, n_users=3, n_items=5, cf_dim=4, history_len=2,
                  max_targets=2, answer_len=2)


def test_model_shape_matches_a_hand_count():
    model, _ = build_bench_model(HAND, "default", torch.float32, "cpu", dropout=0.0, lora_b_std=0.0)
    shape = model_shape(model)
    assert shape.layers == 1 and shape.attn_width == 2 * 4
    # q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate 8x16 + up 8x16 + down 16x8
    assert shape.base_linear_params == 64 + 32 + 32 + 64 + 128 + 128 + 128
    assert shape.head_params == 11 * 8  # untied output head over 10 words + <cf>
    # rank x (in + out) per adapter a token passes: q's task adapter, k/v/o's shared adapter
    assert shape.lora_params_per_token == 2 * (8 + 8) + 2 * (8 + 4) + 2 * (8 + 4) + 2 * (8 + 8)
    # meta-network (4x32 + 32) + (32x16 + 16), mean pooling (no weights), user projector 4x8 + 8
    assert shape.mapping_per_sample_params == (4 * 32 + 32) + (32 * 16 + 16) + 0 + (4 * 8 + 8)
    assert shape.item_proj_params == 4 * 8 + 8


def test_step_flops_hand_count():
    shape = ModelShape(layers=1, attn_width=8, base_linear_params=576, head_params=88, lora_params_per_token=112,
                       mapping_per_sample_params=728, item_proj_params=40)
    # two samples of 4 and 6 real tokens, 3 answer positions, one hybrid sample holding 2 item soft tokens
    counts = {"tokens": 10, "attn_pairs": 4 * 5 + 6 * 7, "answer_positions": 3, "hybrid_samples": 1,
              "item_soft_tokens": 2}
    f = step_flops(shape, counts)
    assert f["base_linear"] == 4 * 576 * 10       # forward 2N + input gradient 2N, per token
    assert f["output_head"] == 4 * 88 * 3         # only where an answer token is predicted
    assert f["lora"] == 6 * 112 * 10              # forward + input gradient + weight gradient
    assert f["attention"] == 6 * 8 * 1 * 62       # (QK^T + PV) x 3 over the causal half
    assert f["mapping"] == 6 * (728 * 1 + 40 * 2)
    assert f["total"] == 23040 + 1056 + 6720 + 2976 + 4848


def _padded_batch(ph: int) -> dict:
    """Two samples of one task, 4 and 6 real tokens padded to 6; the second is hybrid with 1 + 2 placeholders."""
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, ph, 7, ph, ph, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3] = 8
    labels[1, 4:] = torch.tensor([ph, 9])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": torch.tensor([0, 0]),
            "is_hybrid": torch.tensor([False, True]), "n_targets": torch.tensor([0, 2]),
            "user_ids": torch.tensor([0, 1]), "history": torch.full((2, 1), -1), "targets": torch.tensor([[-1, -1], [1, 2]]),
            "row_offsets": torch.tensor([0, 2, 2])}


def test_step_counts_padded_and_packed_agree_on_real_work():
    from ckf_dist.data.packing import pack_batch

    padded = _padded_batch(ph=3)
    c = step_counts(padded, placeholder_id=3)
    assert c == {"tokens": 10, "padded_tokens": 12, "samples": 2, "attn_pairs": 4 * 5 + 6 * 7,
                 "answer_positions": 3, "hybrid_samples": 1, "item_soft_tokens": 2}
    packed = step_counts(pack_batch(padded, pack_tokens=10, pad_id=0, num_tasks=2), placeholder_id=3)
    assert packed["padded_tokens"] == 10  # one row of 10: no padding left
    assert {k: v for k, v in packed.items() if k != "padded_tokens"} == {k: v for k, v in c.items()
                                                                         if k != "padded_tokens"}


@pytest.mark.parametrize("name,peak", [("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("Tesla T4", None)])
def test_peak_table(name, peak):
    assert table_peak_tflops(name) == peak


def test_worker_report_breakdown_sums_to_the_step_and_amortises_the_checkpoint():
    from ckf_dist.profile import BREAKDOWN, worker_report

    shape = dict(layers=1, attn_width=8, base_linear_params=576, head_params=88, lora_params_per_token=112,
                 mapping_per_sample_params=728, item_proj_params=40)
    counts = {"tokens": 10, "padded_tokens": 12, "samples": 2, "attn_pairs": 62, "answer_positions": 3,
              "hybrid_samples": 1, "item_soft_tokens": 2}
    steps = [{"data_wait": 0.01, "cf_pickup": 0.0, "forward": 0.2, "backward": 0.3, "optimizer": 0.05,
              "checkpoint": ckpt, "step_s": 0.6 + ckpt, **counts} for ckpt in (0.0, 2.0)]
    w = {"rank": 0, "device": "cpu", "peak_tflops": 1e-6, "peak_source": "profile.peak_tflops", "steps": steps,
         "checkpoint_every_steps": 100, "peak_memory_bytes": 1, "peak_memory_kind": "process_max_rss", "shape": shape}
    r = worker_report(w)
    assert r["checkpoint_save_s"] == pytest.approx(2.0)
    assert r["breakdown_s"]["checkpoint"] == pytest.approx(2.0 / 100)
    assert r["step_s"] == pytest.approx(0.6 + 0.02)
    assert sum(r["breakdown_s"][k] for k in BREAKDOWN) == pytest.approx(r["step_s"])
    assert r["breakdown_s"]["other"] == pytest.approx(0.04)
    assert r["tokens_per_s"] == pytest.approx(10 / 0.62) and r["padded_tokens_per_s"] == pytest.approx(12 / 0.62)
    assert r["mfu"] == pytest.approx(38640 / 0.62 / 1e12 / 1e-6)


def test_profile_config_is_a_short_run_of_its_own():
    from ckf_dist.config import load_config
    from ckf_dist.profile import profile_config

    cfg = profile_config(load_config(["profile.warmup_steps=3", "profile.steps=5", "profile.trace_steps=2",
                                      "training.max_minutes=10"]), stamp="T")
    assert cfg.profile.enabled and cfg.training.max_steps == 3 + 5 + 2 and cfg.training.max_minutes == 0
    assert cfg.checkpoint.run_name == "ckf-default-profile-T" and not cfg.checkpoint.export_adapter
    assert cfg.training.eval_rows == 0 and cfg.model.tiny.pretrain_steps == 0 and cfg.ray.max_failures == 0
