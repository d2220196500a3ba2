"""bench_multi_lora on a CPU (--tiny, Triton rows under the interpreter): the script runs end to end, its --json
rows carry what the win table needs, and the win table builds from them. A smoke test, not a measurement."""
from __future__ import annotations

import json

from ckf_dist.kernels import bench_multi_lora as bench
from ckf_dist.kernels import build_win_table


def test_tiny_benchmark_json_feeds_the_win_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    methods = "base linear,torch reference,triton fused,triton separate,triton tma,triton side"
    result = bench.main(["--tiny", "--rounds", "2", "--methods", methods, "--json", str(out)])
    printed = capsys.readouterr().out
    assert "NOT a measurement" in printed and "ceilings: copy" in printed and "% of cuBLAS" in printed
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(result["rows"], default=str))
    by_method = {row["method"]: row for row in data["rows"]}
    assert set(by_method) == set(methods.split(","))
    for label, row in by_method.items():
        assert label in printed and row["median_ms"] > 0 and len(row["ms_rounds"]) == 2
        assert row["spread"] >= 0 and row["r_pad"] == 16 and row["tasks"] == 3
        # errors against the fp32 reference, finite and small (fp32 run)
        assert all(0 <= e < 1e-5 for e in row["errors"].values()), (label, row["errors"])
    assert set(by_method["triton side"]["errors"]) == {"y", "delta", "dx", "dshared_a", "dshared_b", "dtask_a",
                                                       "dtask_b"}
    assert set(data["shapes"][0]["gemm_parity"]) == {"fwd", "bwd", "fwd tma", "bwd tma"}
    table = build_win_table.main([str(out), str(tmp_path / "win_table.py")])
    assert len(table) == 1 and table[0]["side_ms"] == by_method["triton side"]["median_ms"]
    assert table[0]["fused_ms"] == min(by_method["triton fused"]["median_ms"], by_method["triton separate"]["median_ms"])
