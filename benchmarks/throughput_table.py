"""One table, JSON and chart from the runs of ``benchmarks/gpu_throughput.sh`` (issue 17).

    python benchmarks/throughput_table.py OUT

Reads ``OUT/<variant>/profile.json`` (``python -m ckf_dist.profile`` runs of the real pipeline) and, when present,
``OUT/peft.json`` (``benchmarks/bench_vs_peft.py``: CKF's step vs HF transformers + peft on the same shape and
tokens, outside the pipeline); writes ``OUT/throughput.json``, ``OUT/throughput.md`` and ``OUT/throughput.png``
(tokens/s and MFU per variant, and each variant's step breakdown). A variant without a report (its run failed or
ran out of time) is listed as missing, never left out silently.
"""
from __future__ import annotations

import json
import os
import sys

TARGETS = {"mfu": 0.45, "peft_ratio": 1.6, "data_wait_fraction": 0.02}  # issue 17 (one H100)


def variant_row(name: str, report: dict) -> dict:
    """The headline figures of one profile.json."""
    t, sw = report["total"], report["switches"]
    step = t["step_s"]
    return {"variant": name, "tokens_per_s": t["tokens_per_s"], "padded_tokens_per_s": t["padded_tokens_per_s"],
            "samples_per_s": t["samples_per_s"], "mfu": t["mfu"], "step_s": step,
            "data_wait_fraction": t["breakdown_s"]["data_wait"] / step if step else None,
            "breakdown_s": t["breakdown_s"], "peak_memory_gib": t["peak_memory_bytes_max"] / 2 ** 30,
            "switches": sw, "device": report["workers"][0]["device"], "peak_source": report["workers"][0]["peak_source"]}


def collect(out: str, variants: list[str]) -> dict:
    rows, missing = [], []
    for name in (v for v in variants if v != "peft"):  # peft: its own JSON, below
        path = os.path.join(out, name, "profile.json")
        if os.path.exists(path):
            with open(path) as f:
                rows.append(variant_row(name, json.load(f)))
        else:
            missing.append(name)
    peft = None
    if os.path.exists(os.path.join(out, "peft.json")):
        with open(os.path.join(out, "peft.json")) as f:
            peft = json.load(f)
    elif "peft" in variants:
        missing.append("peft")
    return {"rows": rows, "missing": missing, "peft": peft, "targets": TARGETS}


def markdown(result: dict) -> str:
    lines = ["| variant | tokens/s (real) | padded tokens/s | MFU | step (ms) | data wait | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        wait = f"{100 * r['data_wait_fraction']:.1f}%" if r["data_wait_fraction"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['padded_tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% | {1e3 * r['step_s']:.1f} | {wait} | {r['peak_memory_gib']:.2f} |")
    p = result["peft"]
    if p:
        ckf, hf = p["sides"]["ckf"], p["sides"]["hf_peft"]
        lines.append("")
        lines.append(f"CKF step vs HF transformers + peft (same shape and tokens, {p['tokens_per_step']:,} tokens per "
                     f"step, outside the pipeline): {ckf['tokens_per_s']:,.0f} vs {hf['tokens_per_s']:,.0f} tokens/s "
                     f"= {p['ratio_tokens_per_s']:.2f}x (target >= {TARGETS['peft_ratio']}x); MFU "
                     f"{100 * ckf['mfu']:.1f}% vs {100 * hf['mfu']:.1f}% (target >= {100 * TARGETS['mfu']:.0f}%)")
    if result["missing"]:
        lines.append("")
        lines.append("missing (failed or out of time): " + ", ".join(result["missing"]))
    return "\n".join(lines)


def chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["variant"] for r in rows]
    a.barh(names, [r["tokens_per_s"] for r in rows])
    for y, r in enumerate(rows):
        a.text(r["tokens_per_s"], y, f" {100 * r['mfu']:.1f}% MFU", va="center", fontsize=8)
    a.set_xlabel("real tokens/s")
    left = [0.0] * len(rows)
    for key in rows[0]["breakdown_s"] if rows else []:
        vals = [1e3 * r["breakdown_s"][key] for r in rows]
        b.barh(names, vals, left=left, label=key)
        left = [x + v for x, v in zip(left, vals)]
    b.set_xlabel("ms per step")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 1:
        print(__doc__)
        return 2
    out = args[0]
    variants = args[1:] or sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
    result = collect(out, variants)
    with open(os.path.join(out, "throughput.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    with open(os.path.join(out, "throughput.md"), "w") as f:
        f.write(table + "\n")
    if result["rows"]:
        chart(result, os.path.join(out, "throughput.png"))
    print(table)
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
