"""A published-style CTR protocol on MovieLens-100K, written as one ``generic`` file: the worked example of the
benchmark-protocol columns (README "Benchmark protocols").

    python benchmarks/ctr_protocol_ml100k.py --raw ../shared/data/ml-100k --out /tmp/ml100k-ctr.parquet

The protocol (the shape of the CTR splits of TALLRec/CoLLM-style papers; this is not their exact file, which is
built from MovieLens-1M):

* every rating is a CTR row, ``label`` = 1 when the rating is > 3, else 0;
* a **global** time split: all rows sorted by (timestamp, user, item), the first 80 % train, the next 10 % valid,
  the last 10 % test (so a user's rows can sit in any split, unlike the per-user rule of ``ckf_dist.data``);
* ``history`` = the 10 items the user rated before the row (any rating, oldest first): the published histories
  include disliked items, which the log-built history (positives only under ``data.ctr_labels=given``) would not;
* ``cold`` = the row's user has no train row (a warm/cold flag given per row).

Columns of the output: user, item, timestamp, label, split, history (list of item ids), cold, title. Prepare it with
``data.source=generic data.raw_path=<out> data.ctr_labels=given data.history_len=10`` (see the README).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ckf_dist.config import DataConfig
from ckf_dist.data.raw import RawData, read_source

HISTORY = 10
FRACTIONS = (0.8, 0.1)  # train, valid; the rest is test


def build(raw_dir: str, history: int = HISTORY) -> pa.Table:
    """The protocol table (module docstring) from the MovieLens-100K folder ``raw_dir``."""
    return protocol_table(read_source(DataConfig(source="movielens-100k", raw_path=raw_dir)), history)


def protocol_table(raw: RawData, history: int = HISTORY) -> pa.Table:
    """The protocol table of any rated source's raw data (ids as strings, ratings 1-5)."""
    inter = raw.interactions
    user = inter.column("raw_user_id").to_numpy(zero_copy_only=False)
    item = inter.column("raw_item_id").to_numpy(zero_copy_only=False)
    ts = inter.column("timestamp").to_numpy()
    rating = inter.column("rating").to_numpy()
    order = np.lexsort((item, user, ts))  # global time order (ties by raw ids)
    user, item, ts, rating = user[order], item[order], ts[order], rating[order]
    n = user.size
    cut_train, cut_valid = int(FRACTIONS[0] * n), int((FRACTIONS[0] + FRACTIONS[1]) * n)
    split = np.where(np.arange(n) < cut_train, "train", np.where(np.arange(n) < cut_valid, "valid", "test"))
    seen: dict[str, list[str]] = {}
    histories = []
    for u, i, t in zip(user.tolist(), item.tolist(), ts.tolist()):
        past = seen.setdefault(u, [])
        # strictly earlier: rows of the same second are not each other's history (ckf_dist.data's rule)
        histories.append([it for it, tt in past if tt < t][-history:])
        past.append((i, t))
    train_users = set(user[:cut_train].tolist())
    titles = dict(zip(raw.items.column("raw_item_id").to_pylist(), raw.items.column("title").to_pylist()))
    return pa.table({
        "user": pa.array(user.tolist(), pa.string()),
        "item": pa.array(item.tolist(), pa.string()),
        "timestamp": pa.array(ts, pa.int64()),
        "label": pa.array((rating > 3).astype(np.int8)),
        "split": pa.array(split.tolist(), pa.string()),
        "history": pa.array(histories, pa.list_(pa.string())),
        "cold": pa.array([u not in train_users for u in user.tolist()]),
        "title": pa.array([titles[i] for i in item.tolist()], pa.string()),
    })


def parse_args(argv: list[str]) -> tuple[argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="the MovieLens-100K folder (u.data, u.item)")
    parser.add_argument("--out", required=True, help="the parquet file to write")
    parser.add_argument("--history", type=int, default=HISTORY, help="history items per row (default 10)")
    return (parser.parse_args(argv),)


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_args(sys.argv[1:] if argv is None else argv)
    table = build(args.raw, args.history)
    pq.write_table(table, args.out)
    counts = {s: int(pc.sum(pc.equal(table.column("split"), s)).as_py()) for s in ("train", "valid", "test")}
    print(f"wrote {table.num_rows} rows to {args.out}: {counts}, positive fraction "
          f"{pc.mean(table.column('label')).as_py():.3f}, cold rows {pc.sum(table.column('cold')).as_py()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
