"""Builds the dispatch's win table from a benchmark run (the GPU issue's last step):

    python -m ckf_dist.kernels.bench_multi_lora --json bench.json
    python -m ckf_dist.kernels.build_win_table bench.json            # writes kernels/win_table.py

Each row: one (GPU, dtype, shape, token count) where both the fused path (the faster of ``triton fused`` /
``triton separate``) and ``triton side`` were timed; ``impl="auto"`` takes the fused path only where it won.
"""
from __future__ import annotations

import argparse
import os

from .dispatch import write_win_table


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", help="output of bench_multi_lora --json")
    ap.add_argument("out", nargs="?", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "win_table.py"),
                    help="module to write (default: the package's win_table.py)")
    return ap.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    table = write_win_table(args.bench_json, args.out)
    wins = sum(row["fused_ms"] < row["side_ms"] for row in table)
    print(f"{len(table)} rows -> {args.out}; the fused path wins in {wins}")
    return table


if __name__ == "__main__":
    main()
