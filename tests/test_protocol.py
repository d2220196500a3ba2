"""Benchmark-protocol columns of the generic source (split, history, candidates, cold, labels as given):
a published split trains and evaluates on exactly its rows. Files are written by each test; the MovieLens
worked example reads ../shared/data (skipped when absent)."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ckf_dist.config import ConfigError, load_config
from ckf_dist.data.canonical import build_canonical
from ckf_dist.data.prepare import prepare
from ckf_dist.data.raw import read_source
from tests.conftest import shared_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
HEADER = "user,item,timestamp,label,split,history,candidates,cold,title"


def _silent(_message: str) -> None:
    """A progress callback that drops the lines."""


def _cfg(raw, out, *extra):
    return load_config([f"data.path={out}", "data.source=generic", f"data.raw_path={raw}", *extra])


def _read(root, sub):
    return pads.dataset(f"{root}/{sub}", format="parquet").to_table()


def _prompts(root, split, task):
    rows = _read(root, f"prompts/{split}").to_pylist()
    return sorted((r for r in rows if r["task"] == task), key=lambda r: r["sample_id"])


def _write(tmp_path, rows, header=HEADER):
    path = tmp_path / "log.csv"
    path.write_text("\n".join([header] + rows) + "\n")
    return path


def _log(n_users=4, per=6):
    """Users u0..u3, 6 rows each, items i<k> titled 'Film <k>'; no protocol values (filled by the tests)."""
    return [[f"u{u}", f"i{(u + k) % 9}", str(100 * k + u), "1", "", "", "", "", f"Film {(u + k) % 9}"]
            for u in range(n_users) for k in range(per)]


def _csv(rows):
    return [",".join(r) for r in rows]


def test_given_split_wins_over_the_per_user_rule(tmp_path):
    rows = _log()
    for r in rows:
        r[4] = "train"
    rows[5][4] = "valid"  # u0's LAST row: the per-user rule would make it test
    rows[0][4] = "test"  # u0's FIRST row: the rule would make it train
    out = tmp_path / "out"
    manifest = prepare(_cfg(_write(tmp_path, _csv(rows)), out, "data.tasks=[ctr]"), progress=_silent)
    assert manifest["interactions_per_split"] == {"train": 22, "valid": 1, "test": 1}
    inter = _read(out, "interactions").to_pylist()
    by_time = {r["timestamp"]: r["split"] for r in inter}
    assert by_time[500] == "valid" and by_time[0] == "test"
    test_ctr = _prompts(out, "test", "ctr")
    positives = [r for r in test_ctr if r["label"] == 1]
    assert len(positives) == 1 and positives[0]["history_item_ids"] == []  # nothing before u0's first row


def test_given_history_replaces_the_log_history_cut_to_history_len(tmp_path):
    rows = _log()
    rows[3][5] = "i8|i7|i6|i5"  # u0's 4th row: a history that is not its log (future, unseen items)
    rows[4][5] = ""  # null in a file with a history column: the user is new for that row
    out = tmp_path / "out"
    prepare(_cfg(_write(tmp_path, _csv(rows)), out, "data.tasks=[ctr,topk]", "data.history_len=3",
                 "data.test_per_user=0", "data.num_candidates=3"), progress=_silent)
    items = {r["raw_item_id"]: r["item_id"] for r in _read(out, "items").to_pylist()}
    train = [r for r in _prompts(out, "train", "ctr") if r["label"] == 1 and r["user_id"] == 0]
    by_target = {r["target_item_ids"][0]: r for r in train}
    given = by_target[items["i3"]]
    assert given["history_item_ids"] == [items["i7"], items["i6"], items["i5"]]  # the last 3 of the given 4
    assert "interacted with: Film 7; Film 6; Film 5. Will the user enjoy Film 3?" in given["prompt_text"]
    assert by_target[items["i4"]]["history_item_ids"] == []
    assert by_target[items["i4"]]["prompt_text"].startswith("The user is new.")


def test_given_ctr_labels_keep_every_row_and_sample_nothing(tmp_path):
    rows = _log()
    for k, r in enumerate(rows):
        r[3] = "0" if k % 3 == 0 else "1"
        r[4] = "train" if int(r[2]) < 300 else "test"
    rows.append(["lonely", "i1", "450", "0", "test", "", "", "", "Film 1"])
    assert any(r[0] == "u1" and r[3] == "0" and r[4] == "test" for r in rows)  # a user with only a label-0 row
    out = tmp_path / "out"
    no_history = [r[:5] + r[6:] for r in rows]  # histories from the log (a history column would define them all)
    path = _write(tmp_path, _csv(no_history), header=HEADER.replace("history,", ""))
    manifest = prepare(_cfg(path, out, "data.ctr_labels=given", "data.tasks=[ctr]"), progress=_silent)
    want = {s: sorted((r[0], r[1], int(r[3])) for r in rows if r[4] == s) for s in ("train", "test")}
    users = {r["user_id"]: r["raw_user_id"] for r in _read(out, "users").to_pylist()}
    items = {r["item_id"]: r["raw_item_id"] for r in _read(out, "items").to_pylist()}
    for split in ("train", "test"):
        got = sorted((users[r["user_id"]], items[r["target_item_ids"][0]], int(r["label"]))
                     for r in _prompts(out, split, "ctr"))
        assert got == want[split]  # exactly the given rows and labels: no sampled negative, none lost
    assert manifest["num_interactions"] == sum(r[3] == "1" for r in rows)  # label-0 rows are no interactions
    assert "lonely" in users.values()
    # a label-0 row's history comes from the user's interactions (label 1) strictly before it
    neg = next(r for r in _prompts(out, "test", "ctr") if users[r["user_id"]] == "u1" and r["label"] == 0)
    inter = [r for r in _read(out, "interactions").to_pylist() if users[r["user_id"]] == "u1"]
    t_neg = next(int(r[2]) for r in rows if r[0] == "u1" and r[3] == "0" and r[4] == "test")
    earlier = [r["item_id"] for r in sorted(inter, key=lambda r: r["timestamp"]) if r["timestamp"] < t_neg]
    assert neg["history_item_ids"] == earlier[-6:] and neg["history_item_ids"]


def test_given_candidates_and_cold_flags(tmp_path):
    rows = _log()
    rows[5][6] = "i2|i5|i0"  # u0's test row (item i5): candidates as given, the positive second
    rows[5][7] = "0"  # u0 has 6 interactions: warm by the rule anyway, given warm
    rows[11][7] = "1"  # u1's test row flagged cold although u1 is warm by the rule (5 > 3 interactions)
    out = tmp_path / "out"
    prepare(_cfg(_write(tmp_path, _csv(rows)), out, "data.num_candidates=3", "data.tasks=[ctr,topk]",
                 "data.cold_user_max_interactions=3"), progress=_silent)
    items = {r["raw_item_id"]: r["item_id"] for r in _read(out, "items").to_pylist()}
    topk = {r["user_id"]: r for r in _prompts(out, "test", "topk")}
    assert topk[0]["target_item_ids"] == [items["i2"], items["i5"], items["i0"]] and topk[0]["label"] == 1
    assert "Candidates: Film 2; Film 5; Film 0." in topk[0]["prompt_text"]
    assert items["i6"] in topk[1]["target_item_ids"]  # no given list: sampled around the positive
    assert topk[1]["is_cold"] and not topk[0]["is_cold"] and not topk[2]["is_cold"]  # given flag, rule elsewhere


def test_invalid_protocol_values_are_bad_rows_with_their_line(tmp_path):
    rows = _log()
    rows[1][4] = "later"  # line 3
    rows[2][6] = "i1|i2|i3"  # line 4: not containing the row's item (i2? no: u0 k=2 -> i2) -> make it miss
    rows[2][6] = "i1|i3|i4"
    rows[3][6] = "i3|i3|i1"  # line 5: the row's item twice
    rows[4][6] = "i4|i1"  # line 6: wrong length
    rows[5][7] = "maybe"  # line 7
    raw = read_source(_cfg(_write(tmp_path, _csv(rows)), tmp_path / "out", "data.num_candidates=3").data)
    assert raw.bad_rows.by_reason == {"bad split": 1, "bad candidates": 3, "bad cold flag": 1}
    assert [e["line"] for e in raw.bad_rows.examples] == [3, 4, 5, 6, 7]
    assert raw.interactions.num_rows == len(rows) - 5


def test_unknown_history_item_with_an_items_file_is_a_bad_row(tmp_path):
    rows = _log()
    rows[2][5] = "i1|nope"
    (tmp_path / "items.csv").write_text("item,title\n" + "\n".join(f"i{k},Film {k}" for k in range(9)) + "\n")
    raw = read_source(_cfg(_write(tmp_path, _csv(rows)), tmp_path / "o", f"data.meta_path={tmp_path / 'items.csv'}").data)
    assert raw.bad_rows.by_reason == {"unknown item id": 1} and raw.bad_rows.examples[0]["line"] == 4


def test_parquet_list_columns_and_missing_columns_for_given_labels(tmp_path):
    pq.write_table(pa.table({
        "user": ["a", "a", "b"], "item": ["x", "y", "x"], "timestamp": [1, 2, 3], "label": [1, 0, 1],
        "split": ["train", "test", "test"], "history": pa.array([[], [7], None], pa.list_(pa.int64())),
    }), tmp_path / "log.parquet")
    cfg = _cfg(tmp_path / "log.parquet", tmp_path / "o", "data.ctr_labels=given")
    data = build_canonical(read_source(cfg.data), cfg.data)
    assert data.raw_item_ids == ["7", "x", "y"]  # an item named only in a history joins the catalogue
    assert data.history_lists().to_pylist() == [[], []] and data.negatives.history.to_pylist() == [[0]]
    pq.write_table(pa.table({"user": ["a"], "item": ["x"], "timestamp": [1], "label": [1]}), tmp_path / "nosplit.parquet")
    with pytest.raises(ValueError, match="data.column_map.split"):
        read_source(_cfg(tmp_path / "nosplit.parquet", tmp_path / "o", "data.ctr_labels=given").data)
    pq.write_table(pa.table({"user": ["a"], "item": ["x"], "timestamp": [1], "split": ["train"]}),
                   tmp_path / "nolabel.parquet")
    with pytest.raises(ValueError, match="data.column_map.label"):
        read_source(_cfg(tmp_path / "nolabel.parquet", tmp_path / "o", "data.ctr_labels=given").data)


def test_protocol_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.ctr_labels"):
        load_config(["data.ctr_labels=given"])  # the synthetic source has no labels to give
    with pytest.raises(ConfigError, match="data.ctr_labels"):
        load_config(["data.source=generic", "data.raw_path=x", "data.ctr_labels=maybe"])
    with pytest.raises(ConfigError, match="data.list_delimiter"):
        load_config(["data.source=generic", "data.raw_path=x", "data.list_delimiter=;", "data.csv_delimiter=;"])


def test_no_protocol_columns_leave_the_prepared_set_unchanged(tmp_path):
    """The protocol code paths must not move a byte of an ordinary generic set's prompts."""
    rows = _log()
    plain = _write(tmp_path, [",".join(r[:4] + r[8:]) for r in rows], header="user,item,timestamp,label,title")
    out = tmp_path / "out"
    prepare(_cfg(plain, out, "data.tasks=[ctr,topk]", "data.num_candidates=3"), progress=_silent)
    for split in ("train", "test"):
        ctr = _prompts(out, split, "ctr")
        assert sum(r["label"] == 0 for r in ctr) == sum(r["label"] == 1 for r in ctr)  # sampled, balanced
    rows_test = _prompts(out, "test", "topk")
    assert all(len(r["target_item_ids"]) == 3 for r in rows_test)


def _protocol_module():
    spec = importlib.util.spec_from_file_location("ctr_protocol_ml100k", REPO / "benchmarks" / "ctr_protocol_ml100k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_movielens_worked_example_prepares_exactly_the_published_rows(tmp_path):
    raw_dir = shared_dataset("ml-100k")
    table = _protocol_module().build(str(raw_dir))
    assert table.num_rows == 100_000
    path = tmp_path / "ml.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    manifest = prepare(_cfg(path, out, "data.ctr_labels=given", "data.history_len=10", "data.tasks=[ctr]"),
                       progress=_silent)
    assert manifest["prompt_rows_per_split"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
    test = _read(out, "prompts/test")
    labels = np.asarray(test.column("label").to_pylist())
    published = table.filter(pa.compute.equal(table.column("split"), "test"))
    assert labels.sum() == sum(published.column("label").to_pylist())
    assert sum(test.column("is_cold").to_pylist()) == sum(published.column("cold").to_pylist())
    lengths = [len(h) for h in test.column("history_item_ids").to_pylist()]
    assert sorted(lengths) == sorted(len(h) for h in published.column("history").to_pylist())


@pytest.mark.integration
def test_a_given_protocol_trains_and_evaluates_end_to_end(tmp_path):
    """A published-style CTR file (global time split, labels and histories as given) through the real pipeline:
    ``python -m ckf_dist.train`` (local Ray, DeepSpeed, tiny model) then ``python -m ckf_dist.evaluate`` on the
    test split: every given test row is scored, none sampled, with its given label."""
    import json
    import subprocess
    import sys

    from ckf_dist.config import DataConfig

    raw = read_source(DataConfig(source="synthetic", num_users=40, num_items=40, interactions_per_user=10))
    table = _protocol_module().protocol_table(raw, history=4)
    pq.write_table(table, tmp_path / "log.parquet")
    common = [f"data.path={tmp_path}/data", "data.source=generic", f"data.raw_path={tmp_path}/log.parquet",
              "data.ctr_labels=given", "data.history_len=4", "data.tasks=[ctr]", "cf.epochs=3", "cf.dim=8",
              "model.tiny.vocab_size=400", "model.tiny.pretrain_steps=10", "lora.rank=4", "lora.alpha=8",
              "ray.local_num_cpus=2", f"checkpoint.storage_path={tmp_path}/runs", "checkpoint.run_name=given"]
    env = dict(__import__("os").environ, HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    train = subprocess.run([sys.executable, "-m", "ckf_dist.train", *common, "training.max_steps=4",
                            "training.batch_size=8", "training.eval_rows=0", "checkpoint.every_steps=4"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0 and "done: step 4" in train.stdout + train.stderr, (train.stdout + train.stderr)[-4000:]
    n_test = int(pa.compute.sum(pa.compute.equal(table.column("split"), "test")).as_py())
    out = tmp_path / "eval.json"
    ev = subprocess.run([sys.executable, "-m", "ckf_dist.evaluate", "--checkpoint", str(tmp_path / "runs" / "given"),
                         f"--out={out}", *common, "eval.split=test", f"eval.max_rows={n_test}", "eval.batch_size=16"],
                        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    report = json.loads(out.read_text())
    test = table.filter(pa.compute.equal(table.column("split"), "test"))
    assert report["n_rows"]["ctr"]["all"] == n_test
    assert report["n_rows"]["ctr"]["cold"] == sum(test.column("cold").to_pylist())
    assert 0.0 <= report["metrics"]["ctr"]["all"]["auc"] <= 1.0
