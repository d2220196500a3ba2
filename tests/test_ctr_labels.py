"""CTR labels and CTR negatives on a hand-made interaction log, with the exact rows stated.

Spec (``ckf_method.md`` section 4, ``data/prompts.py``): a CTR row of an interaction is a click when its rating is
> 3 (a rating of 3 is *not* a click); sampled negatives (label 0, answer "No") are added until the classes of a
split balance, and each is an item the user never interacted with in *any* split.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from ckf_dist.config import DataConfig
from ckf_dist.data.canonical import build_canonical
from ckf_dist.data.prompts import NegativeSampler, build_prompts
from ckf_dist.data.raw import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, RawData
from ckf_dist.data.schema import PLACEHOLDER

CATALOGUE = [str(i) for i in range(1, 13)]  # items "1".."12"
# user -> [(item, rating)] in time order. test_per_user=1: the last interaction is test, the one before valid.
LOG = {
    "1": [("1", 2.0), ("2", 3.0), ("3", 4.0), ("4", 5.0), ("5", 1.0), ("6", 5.0)],
    # a dense user: 9 of the 12 items; never interacted with 6 (user 1's test item), 11, 12
    "2": [("1", 5.0), ("2", 4.0), ("3", 5.0), ("4", 5.0), ("5", 4.0), ("7", 5.0), ("8", 5.0), ("9", 4.0),
          ("10", 5.0)],
}
SEEN = {u: {i for i, _ in rows} for u, rows in LOG.items()}
NEVER = {u: set(CATALOGUE) - SEEN[u] for u in LOG}  # user 1: 7..12; user 2: 6, 11, 12
# (user, item, label) of the rows of interacted items, per split: label = rating > 3
EXPECTED = {
    "train": Counter([("1", "1", 0), ("1", "2", 0), ("1", "3", 1), ("1", "4", 1)]
                     + [("2", i, 1) for i in ("1", "2", "3", "4", "5", "7", "8")]),
    "valid": Counter([("1", "5", 0), ("2", "9", 1)]),
    "test": Counter([("1", "6", 1), ("2", "10", 1)]),
}
# sampled negatives: positives - negatives of the split (train 9 - 2, valid 1 - 1, test 2 - 0)
EXPECTED_SAMPLED = {"train": 7, "valid": 0, "test": 2}


def _raw() -> RawData:
    rows = [(u, i, r, t) for u, log in LOG.items() for t, (i, r) in enumerate(log, start=1)]
    cols = list(zip(*rows))
    inter = pa.table({"raw_user_id": pa.array(cols[0], pa.string()), "raw_item_id": pa.array(cols[1], pa.string()),
                      "rating": pa.array(cols[2], pa.float32()), "timestamp": pa.array(cols[3], pa.int64()),
                      "review": pa.array([None] * len(rows), pa.string())}, schema=RAW_INTERACTIONS_SCHEMA)
    items = pa.table({"raw_item_id": pa.array(CATALOGUE, pa.string()),
                      "title": pa.array([f"movie {i}" for i in CATALOGUE], pa.string())}, schema=RAW_ITEMS_SCHEMA)
    return RawData(source="handmade", interactions=inter, items=items).validate()


@pytest.fixture
def built():
    """Built in each test (a few ms): a module-scoped build would be attributed to the first test alone by
    mutation testing, which then checks every mutant of the prompt code against that test only."""
    cfg = DataConfig(test_per_user=1, tasks=["ctr"], seed=5)
    raw = _raw()
    data = build_canonical(raw, cfg)
    return data, build_prompts(data, cfg, raw.has_ratings, raw.has_reviews, raw.source)


def _rows(data, table):
    """(raw user, raw item, label, answer, prompt) of each CTR row."""
    out = []
    for r in table.to_pylist():
        assert r["task"] == "ctr" and len(r["target_item_ids"]) == 1
        out.append((data.raw_user_ids[r["user_id"]], data.raw_item_ids[r["target_item_ids"][0]], int(r["label"]),
                    r["answer"], r["prompt_hybrid"]))
    return out


def test_the_log_splits_as_the_expected_labels_assume(built):
    data, _ = built
    split_of = {(data.raw_user_ids[u], data.raw_item_ids[i]): s
                for u, i, s in zip(data.user.tolist(), data.item.tolist(), data.split.tolist())}
    assert {k for k, s in split_of.items() if s == 0} == {(u, i) for u, i, _ in EXPECTED["train"]}
    assert {k for k, s in split_of.items() if s == 1} == {(u, i) for u, i, _ in EXPECTED["valid"]}
    assert {k for k, s in split_of.items() if s == 2} == {(u, i) for u, i, _ in EXPECTED["test"]}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_ctr_labels_are_rating_above_3_exactly(built, split):
    """Ratings 2 and 3 -> 0 ("No"), 4 and 5 -> 1 ("Yes"), one row per interaction of the split."""
    data, prompts = built
    rows = _rows(data, prompts.tables[split])
    interacted = Counter((u, i, y) for u, i, y, _, _ in rows if i in SEEN[u])
    assert interacted == EXPECTED[split]
    for u, i, y, answer, prompt in rows:
        assert answer == ("Yes" if y == 1 else "No"), (u, i, y, answer)
        assert prompt.endswith(f" Will the user enjoy movie {i} {PLACEHOLDER}? Answer Yes or No."), prompt


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_sampled_negatives_are_items_the_user_never_interacted_with(built, split):
    """The rows beyond the split's interactions are label-0 rows of never-interacted items (in any split), as
    many as balance the classes."""
    data, prompts = built
    rows = _rows(data, prompts.tables[split])
    sampled = [(u, i, y, a) for u, i, y, a, _ in rows if i not in SEEN[u]]
    assert len(sampled) == EXPECTED_SAMPLED[split] == len(rows) - sum(EXPECTED[split].values())
    for u, i, y, answer in sampled:
        assert i in NEVER[u] and y == 0 and answer == "No", (u, i, y, answer)
    # each interaction anchors at most one sampled negative (its user and history): anchors drawn without replacement
    anchors = [(r["user_id"], tuple(r["history_item_ids"])) for r in prompts.tables[split].to_pylist()
               if data.raw_item_ids[r["target_item_ids"][0]] not in SEEN[data.raw_user_ids[r["user_id"]]]]
    assert len(set(anchors)) == len(anchors)
    labels = [y for _, _, y, _, _ in rows]
    assert labels.count(1) == labels.count(0)
    assert prompts.ctr_positive_fraction[split] == pytest.approx(0.5)


def test_negative_sampler_draws_exactly_the_never_interacted_items():
    """The dense user 2 (rejection path, 3 items left) and user 1: every draw is in the complement of the user's
    items over all splits, and the draws cover that whole complement (no item is excluded by mistake)."""
    data = build_canonical(_raw(), DataConfig(test_per_user=1))
    sampler = NegativeSampler(data)
    uid = {u: k for k, u in enumerate(data.raw_user_ids)}
    for user in ("1", "2"):
        draws = sampler.sample(np.random.default_rng(0), np.full(400, uid[user], dtype=np.int64), 1)[:, 0]
        assert {data.raw_item_ids[i] for i in draws.tolist()} == NEVER[user], user
    three = sampler.sample(np.random.default_rng(1), np.full(50, uid["2"], dtype=np.int64), 3)
    assert all({data.raw_item_ids[i] for i in row} == NEVER["2"] for row in three.tolist())  # distinct per row
