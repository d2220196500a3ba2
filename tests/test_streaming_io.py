"""The file side of ``data/streaming.py`` without Ray: the manifest reader, the tiny tokenizer's training corpus
(titles + a slice of every train shard, in a fixed order) and the per-batch task filter + tokenisation that the
Ray Data pipeline maps over its blocks."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ckf_dist.config import load_config
from ckf_dist.data.schema import MANIFEST, PLACEHOLDER, TASK_IDS
from ckf_dist.data.streaming import _filter_and_tokenize, read_manifest, tokenize_batch, tokenizer_corpus


def _write_folder(root):
    """items + two train prompt shards (4 and 2 rows) + a manifest."""
    os.makedirs(root / "items")
    os.makedirs(root / "prompts" / "train")
    pq.write_table(pa.table({"item_id": pa.array([0, 1, 2], pa.int64()), "title": ["alpha", "beta", "gamma"]}),
                   root / "items" / "part-0.parquet")
    for name, n, tag in (("part-0.parquet", 4, "a"), ("part-1.parquet", 2, "b")):
        pq.write_table(pa.table({"prompt_text": [f"prompt {tag}{k}" for k in range(n)],
                                 "answer": [f"answer {tag}{k}" for k in range(n)]}), root / "prompts" / "train" / name)
    (root / "prompts" / "train" / "notes.txt").write_text("not a shard")
    (root / MANIFEST).write_text(json.dumps({"format_version": 1, "num_users": 7}))


def test_read_manifest(tmp_path):
    _write_folder(tmp_path)
    cfg = load_config([f"data.path={tmp_path}"])
    assert read_manifest(cfg) == {"format_version": 1, "num_users": 7}
    assert read_manifest(cfg, path=str(tmp_path)) == {"format_version": 1, "num_users": 7}
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as err:
        read_manifest(cfg, path=str(missing))
    assert str(err.value) == (f"no prepared data set at {missing} ({MANIFEST} missing): run "
                              f"python -m ckf_dist.data.prepare data.path={missing}")


@pytest.mark.parametrize("max_rows,per_file", [(4000, 4), (4, 2), (3, 1), (1, 1)])
def test_tokenizer_corpus_titles_then_a_slice_of_every_shard(tmp_path, max_rows, per_file):
    _write_folder(tmp_path)
    cfg = load_config([f"data.path={tmp_path}"])
    want = ["alpha", "beta", "gamma"]
    for tag, n in (("a", 4), ("b", 2)):  # shards in name order; prompts then answers of each
        k = min(per_file, n)
        want += [f"prompt {tag}{i}" for i in range(k)] + [f"answer {tag}{i}" for i in range(k)]
    assert tokenizer_corpus(cfg, max_rows=max_rows) == want
    assert tokenizer_corpus(load_config([]), max_rows=max_rows, path=str(tmp_path)) == want


def test_tokenizer_corpus_without_train_shards_names_the_folder(tmp_path):
    _write_folder(tmp_path)
    for f in os.listdir(tmp_path / "prompts" / "train"):
        if f.endswith(".parquet"):
            os.remove(tmp_path / "prompts" / "train" / f)
    with pytest.raises(FileNotFoundError, match=f"^no train prompt shards under {tmp_path}/prompts/train$"):
        tokenizer_corpus(load_config([f"data.path={tmp_path}"]))


def _batch_and_tokenizer():
    from tests.llama_like_tokenizer import build_llama_like_tokenizer

    tok = build_llama_like_tokenizer()
    ctr = "The user <cf> interacted with: alpha. Will the user enjoy delta <cf>? Answer Yes or No."
    rating = "The user <cf> rated: alpha: 4. How will the user rate delta <cf>? Answer 1 to 5."
    rows = [("ctr", ctr, "Yes"), ("rating", rating, "4"), ("ctr", ctr, "No")]
    batch = pa.table({
        "sample_id": ["a", "b", "c"], "task_id": pa.array([TASK_IDS[t] for t, _, _ in rows], pa.int8()),
        "user_id": pa.array([1, 2, 3], pa.int64()), "is_cold": [False, True, False],
        "label": pa.array([1.0, 4.0, 0.0], pa.float32()), "history_item_ids": pa.array([[1]] * 3, pa.list_(pa.int64())),
        "target_item_ids": pa.array([[5]] * 3, pa.list_(pa.int64())),
        "prompt_text": [p.replace(" " + PLACEHOLDER, "") for _, p, _ in rows], "prompt_hybrid": [p for _, p, _ in rows],
        "answer": [a for _, _, a in rows]})
    return batch, tok


def test_filter_and_tokenize_keeps_only_the_wanted_tasks():
    batch, tok = _batch_and_tokenizer()
    only_ctr = _filter_and_tokenize(batch, tok, 512, ["ctr"])
    assert only_ctr.column("sample_id").to_pylist() == ["a", "c"]
    assert only_ctr.equals(tokenize_batch(batch.filter(pa.array([True, False, True])), tok, 512))
    both = _filter_and_tokenize(batch, tok, 512, ["ctr", "rating"])
    assert both.equals(tokenize_batch(batch, tok, 512))


def test_filter_and_tokenize_a_batch_without_wanted_tasks_is_empty():
    from ckf_dist.data.streaming import TOKENISED_SCHEMA

    batch, tok = _batch_and_tokenizer()
    out = _filter_and_tokenize(batch, tok, 512, ["topk"])
    assert out.num_rows == 0 and out.schema.equals(TOKENISED_SCHEMA)
