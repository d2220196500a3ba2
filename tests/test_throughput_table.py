"""benchmarks/throughput_table.py: the issue-17 table from the profile reports of gpu_throughput.sh's runs; a
variant without a report is named as missing, never dropped."""
from __future__ import annotations

import importlib.util
import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("throughput_table", REPO / "benchmarks" / "throughput_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)


def _profile(tokens_per_s: float, step_s: float, wait_s: float) -> dict:
    breakdown = {"data_wait": wait_s, "cf_pickup": 0.0, "forward": step_s / 2 - wait_s, "backward": step_s / 2,
                 "optimizer": 0.0, "checkpoint": 0.0, "other": 0.0}
    return {"total": {"tokens_per_s": tokens_per_s, "padded_tokens_per_s": 2 * tokens_per_s, "samples_per_s": 10.0,
                      "mfu": 0.25, "step_s": step_s, "breakdown_s": breakdown, "peak_memory_bytes_max": 3 * 2 ** 30},
            "switches": {"zero_stage": 2}, "workers": [{"device": "NVIDIA H100", "peak_source": "table"}]}


def test_rows_peft_ratio_and_missing_variants(tmp_path):
    for name, tps in (("zero2-triton", 50_000.0), ("zero3-torch", 20_000.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "profile.json").write_text(json.dumps(_profile(tps, 0.2, 0.003)))
    (tmp_path / "peft.json").write_text(json.dumps({
        "tokens_per_step": 8192, "ratio_tokens_per_s": 1.75,
        "sides": {"ckf": {"tokens_per_s": 70_000.0, "mfu": 0.4}, "hf_peft": {"tokens_per_s": 40_000.0, "mfu": 0.2}}}))
    assert table.main([str(tmp_path), "zero3-triton", "zero3-torch", "zero2-triton", "peft"]) == 0
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["zero3-torch", "zero2-triton"]
    assert result["missing"] == ["zero3-triton"]  # no report: named, not dropped; peft has its own JSON
    assert result["rows"][1]["data_wait_fraction"] == 0.003 / 0.2
    md = (tmp_path / "throughput.md").read_text()
    assert "| zero2-triton | 50,000 | 100,000 | 25.0% | 200.0 | 1.5% | 3.00 |" in md
    assert "70,000 vs 40,000 tokens/s = 1.75x" in md and "missing (failed or out of time): zero3-triton" in md
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_no_report_at_all_fails(tmp_path):
    assert table.main([str(tmp_path), "zero2-triton", "peft"]) == 1
    assert json.loads((tmp_path / "throughput.json").read_text())["missing"] == ["zero2-triton", "peft"]
