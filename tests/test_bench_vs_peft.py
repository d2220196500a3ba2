"""benchmarks/bench_vs_peft.py at the tiny CPU shape: both sides train on the same tokens, report positive
throughput, an MFU in (0, 1] by the same FLOP formula, and the ratio of their tokens/s."""
import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_vs_peft", REPO / "benchmarks" / "bench_vs_peft.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_tiny_run_reports_both_sides_and_their_ratio(tmp_path, capsys):
    out = bench.main(["--tiny", "--warmup", "1", "--steps", "2", "--json", str(tmp_path / "r.json")])
    ckf, hf = out["sides"]["ckf"], out["sides"]["hf_peft"]
    assert out["tiny"] and out["tokens_per_step"] == 8 * 64
    for side in (ckf, hf):
        assert len(side["ms"]) == 2 and side["tokens_per_s"] > 0 and 0 < side["mfu"] <= 1
    # same targets and rank: peft's single LoRA on q, k, v, o has as many parameters per layer as one CKF adapter
    # per target (CKF adds the other tasks' q adapters and the mapping side)
    assert ckf["trainable_params"] > hf["trainable_params"] > 0
    # HF's head runs on every position, CKF's only on the answers: HF's step counts more FLOPs
    assert hf["flops"] > ckf["flops"] > 0
    assert out["ratio_tokens_per_s"] == pytest.approx(ckf["tokens_per_s"] / hf["tokens_per_s"])
    assert json.loads((tmp_path / "r.json").read_text())["ratio_tokens_per_s"] == pytest.approx(out["ratio_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "CKF / HF + peft tokens/s" in printed and "HF transformers + peft" in printed


def test_command_line_rejects_an_unknown_shape():
    with pytest.raises(SystemExit):
        bench.parse_args(["--shape", "llama-70b"])
