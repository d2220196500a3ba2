"""Prompt rows stated exactly on a hand-made log (``data/prompts.py``; the templates of its docstring table): every
task's hybrid and text prompt, answer, label, sample id and split; the skip rules and their messages; the rating
texts; the negative sampler's messages and its distribution. Every build runs inside its test (no module-scoped
fixture), so that mutation testing attributes the code to every test that checks it."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from ckf_dist.config import DataConfig
from ckf_dist.data.canonical import build_canonical
from ckf_dist.data.prompts import NegativeSampler, build_prompts, check_placeholders, rating_text
from ckf_dist.data.raw import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, RawData
from ckf_dist.data.schema import PLACEHOLDER, PROMPTS_SCHEMA, SPLITS, TASK_IDS

P = " " + PLACEHOLDER
LONG = "Great. I really love this little guitar, it sounds warm and full every day."
# (user, item, rating or None, timestamp, review or None); test_per_user=1: user 1 -> train 1, valid 2, test 3;
# user 2 -> train 3, test 4. Item 2 has no rating (listed without a score in "rated:" histories).
LOG = [("1", "1", 5.0, 1, LONG), ("1", "2", None, 2, None), ("1", "3", 3.5, 3, "It is fine for the price but the strings buzz."),
       ("2", "3", 2.0, 1, None), ("2", "4", 4.0, 2, "Solid stand, holds two guitars without wobbling at all.")]
CATALOGUE = [str(i) for i in range(1, 7)]
ALL_TASKS = ["ctr", "topk", "rating", "explanation", "review_rating"]


def raw_data(log=LOG, catalogue=CATALOGUE) -> RawData:
    cols = list(zip(*log))
    inter = pa.table({"raw_user_id": pa.array(cols[0], pa.string()), "raw_item_id": pa.array(cols[1], pa.string()),
                      "rating": pa.array(cols[2], pa.float32()), "timestamp": pa.array(cols[3], pa.int64()),
                      "review": pa.array(cols[4], pa.string())}, schema=RAW_INTERACTIONS_SCHEMA)
    items = pa.table({"raw_item_id": pa.array(catalogue, pa.string()),
                      "title": pa.array([f"movie {i}" for i in catalogue], pa.string())}, schema=RAW_ITEMS_SCHEMA)
    return RawData(source="handmade", interactions=inter, items=items).validate()


def build(tasks=ALL_TASKS, has_ratings=True, has_reviews=True, log=LOG, catalogue=CATALOGUE, lines=None, **cfg_kw):
    cfg = DataConfig(tasks=list(tasks), test_per_user=cfg_kw.pop("test_per_user", 1), num_candidates=3,
                     review_max_words=5, seed=11, **cfg_kw)
    data = build_canonical(raw_data(log, catalogue), cfg)
    return data, build_prompts(data, cfg, has_ratings, has_reviews, "handmade",
                               progress=None if lines is None else lines.append)


def rows_by_key(data, prompts):
    """{(split, task, raw user, raw target item(s)): row}; top-K rows keyed by their positive item."""
    out = {}
    for split, table in prompts.tables.items():
        assert table.schema.equals(PROMPTS_SCHEMA)
        for r in table.to_pylist():
            targets = [data.raw_item_ids[t] for t in r["target_item_ids"]]
            key_item = targets[int(r["label"])] if r["task"] == "topk" else targets[0]
            key = (split, r["task"], data.raw_user_ids[r["user_id"]], key_item)
            assert key not in out or r["task"] == "ctr", key  # ctr: a sampled negative may repeat an item
            out.setdefault(key, r)
    return out


# (split, task, user, item): (hybrid prompt, answer, label)
EXACT = {
    ("train", "ctr", "1", "1"): (f"The user{P} is new. Will the user enjoy movie 1{P}? Answer Yes or No.", "Yes", 1.0),
    ("train", "ctr", "2", "3"): (f"The user{P} is new. Will the user enjoy movie 3{P}? Answer Yes or No.", "No", 0.0),
    ("valid", "ctr", "1", "2"): (f"The user{P} interacted with: movie 1. Will the user enjoy movie 2{P}? Answer Yes or No.",
                                 "Yes", 1.0),  # no rating: a positive (implicit feedback)
    ("test", "ctr", "1", "3"): (f"The user{P} interacted with: movie 1; movie 2. Will the user enjoy movie 3{P}? "
                                "Answer Yes or No.", "Yes", 1.0),
    ("test", "ctr", "2", "4"): (f"The user{P} interacted with: movie 3. Will the user enjoy movie 4{P}? Answer Yes or No.",
                                "Yes", 1.0),
    ("train", "rating", "1", "1"): (f"The user{P} is new. How will the user rate movie 1{P}? Answer 1 to 5.", "5", 5.0),
    ("train", "rating", "2", "3"): (f"The user{P} is new. How will the user rate movie 3{P}? Answer 1 to 5.", "2", 2.0),
    ("test", "rating", "1", "3"): (f"The user{P} rated: movie 1: 5; movie 2. How will the user rate movie 3{P}? "
                                   "Answer 1 to 5.", "3.5", 3.5),
    ("test", "rating", "2", "4"): (f"The user{P} rated: movie 3: 2. How will the user rate movie 4{P}? Answer 1 to 5.",
                                   "4", 4.0),
    ("train", "explanation", "1", "1"): (f"The user{P} is new. Explain what the user thinks of movie 1{P}.",
                                         "I really love this little", -1.0),
    ("test", "explanation", "1", "3"): (f"The user{P} interacted with: movie 1; movie 2. Explain what the user thinks "
                                        f"of movie 3{P}.", "It is fine for the", -1.0),
    ("test", "explanation", "2", "4"): (f"The user{P} interacted with: movie 3. Explain what the user thinks of "
                                        f"movie 4{P}.", "Solid stand, holds two guitars", -1.0),
    ("train", "review_rating", "1", "1"): (f"The user{P} wrote about movie 1{P}: 'I really love this little'. What "
                                           "rating did the user give? Answer 1 to 5.", "5", 5.0),
    ("test", "review_rating", "1", "3"): (f"The user{P} wrote about movie 3{P}: 'It is fine for the'. What rating did "
                                          "the user give? Answer 1 to 5.", "3.5", 3.5),
    ("test", "review_rating", "2", "4"): (f"The user{P} wrote about movie 4{P}: 'Solid stand, holds two guitars'. What "
                                          "rating did the user give? Answer 1 to 5.", "4", 4.0),
}
INTRO = {("1", "1"): f"The user{P} is new.", ("1", "2"): f"The user{P} interacted with: movie 1.",
         ("1", "3"): f"The user{P} interacted with: movie 1; movie 2.", ("2", "3"): f"The user{P} is new.",
         ("2", "4"): f"The user{P} interacted with: movie 3."}


def test_every_prompt_row_exactly():
    data, prompts = build()
    rows = rows_by_key(data, prompts)
    for key, (hybrid, answer, label) in EXACT.items():
        r = rows[key]
        assert (r["prompt_hybrid"], r["answer"], r["label"]) == (hybrid, answer, label), key
        assert r["prompt_text"] == hybrid.replace(P, ""), key
        assert r["split"] == key[0] and r["task"] == key[1] and r["task_id"] == TASK_IDS[key[1]]
    # top-K: the positive's title is the answer; the candidates are listed in order, each with its placeholder
    for (split, task, user, item), r in rows.items():
        if task != "topk":
            continue
        titles = [f"movie {data.raw_item_ids[c]}" for c in r["target_item_ids"]]
        listed = "; ".join(t + P for t in titles)
        assert r["prompt_hybrid"] == f"{INTRO[(user, item)]} Candidates: {listed}. Which will the user choose next?"
        assert r["answer"] == f"movie {item}" and len(titles) == 3
    # exactly these rows per (split, task) (+ the sampled CTR negatives), numbered "<split>-<task>-<k>"
    want = Counter((s, t) for s, t, _, _ in EXACT) + Counter({("train", "topk"): 2, ("valid", "topk"): 1,
                                                              ("test", "topk"): 2, ("valid", "ctr"): 1,
                                                              ("test", "ctr"): 2})
    for split in SPLITS:
        table = prompts.tables[split].to_pylist()
        got = Counter((split, r["task"]) for r in table)
        assert got == Counter({k: v for k, v in want.items() if k[0] == split}), split
        for task in ALL_TASKS:
            ids = sorted(r["sample_id"] for r in table if r["task"] == task)
            assert ids == sorted(f"{split}-{task}-{k}" for k in range(got[(split, task)]))
        assert prompts.counts[split] == {t: got[(split, t)] for t in ALL_TASKS}
    longest = max(len(r["prompt_hybrid"]) for t in prompts.tables.values() for r in t.to_pylist())
    assert prompts.max_prompt_chars == longest
    assert prompts.ctr_positive_fraction == {"train": 0.5, "valid": 0.5, "test": 0.5}
    assert prompts.skipped_tasks == {}


def test_topk_positive_position_covers_every_slot():
    """The positive's index among the candidates is drawn over all K slots (0 included)."""
    log = [(str(u), str(i), 4.0, i, None) for u in range(1, 5) for i in range(1, 9)]
    data, prompts = build(tasks=["topk"], log=log, catalogue=[str(i) for i in range(1, 21)], test_per_user=2)
    labels = [int(r["label"]) for t in prompts.tables.values() for r in t.to_pylist()]
    assert len(labels) == 32 and set(labels) == {0, 1, 2}


@pytest.mark.parametrize("has_ratings,has_reviews,skipped", [
    (False, False, {"rating": "source 'handmade' has no ratings (implicit feedback)",
                    "explanation": "source 'handmade' has no review text to explain",
                    "review_rating": "source 'handmade' has no ratings and review text"}),
    (True, False, {"explanation": "source 'handmade' has no review text to explain",
                   "review_rating": "source 'handmade' has no review text"}),
    (False, True, {"rating": "source 'handmade' has no ratings (implicit feedback)",
                   "review_rating": "source 'handmade' has no ratings"}),
    (True, True, {}),
])
def test_skipped_tasks_and_their_reasons(has_ratings, has_reviews, skipped):
    lines = []
    _, prompts = build(has_ratings=has_ratings, has_reviews=has_reviews, lines=lines)
    assert prompts.skipped_tasks == skipped
    assert lines == [f"[prepare] task {t!r} skipped: {why}" for t, why in skipped.items()]
    made = {r["task"] for t in prompts.tables.values() for r in t.to_pylist()}
    assert made == set(ALL_TASKS) - set(skipped)


def test_only_requested_tasks_are_skipped_or_built():
    _, prompts = build(tasks=["ctr"], has_ratings=False, has_reviews=False)
    assert prompts.skipped_tasks == {}
    _, none_left = build(tasks=["rating"], has_ratings=False)
    assert set(none_left.skipped_tasks) == {"rating"}
    for split in SPLITS:
        assert none_left.tables[split].num_rows == 0 and none_left.tables[split].schema.equals(PROMPTS_SCHEMA)


def test_a_split_without_rows_has_ctr_positive_fraction_0():
    _, prompts = build(tasks=["ctr"], test_per_user=0)  # everything in train
    assert prompts.tables["valid"].num_rows == prompts.tables["test"].num_rows == 0
    assert prompts.ctr_positive_fraction["valid"] == 0.0 and prompts.ctr_positive_fraction["test"] == 0.0
    assert prompts.ctr_positive_fraction["train"] == 0.5


def test_check_placeholders_on_a_single_row():
    _, prompts = build(tasks=["ctr"])
    one = prompts.tables["train"].slice(0, 1)
    check_placeholders(one)  # a good row passes
    broken = one.set_column(one.schema.get_field_index("prompt_hybrid"), "prompt_hybrid",
                            pa.array([f"The user{P} is new."], pa.string()))
    with pytest.raises(ValueError, match="has 1 placeholders, expected 2; text prompt has 0"):
        check_placeholders(broken)


def test_rating_text():
    assert rating_text(np.array([], dtype=np.float32)).equals(pa.array([], pa.string()))
    assert rating_text(np.array([4.0], dtype=np.float32)).to_pylist() == ["4"]
    assert rating_text(np.array([np.nan, 3.5, 4.0, 3.5, 4.2], dtype=np.float32)).to_pylist() == ["", "3.5", "4", "3.5",
                                                                                                   "4.2"]
    assert rating_text(np.array([2.75])).type == pa.string()


def test_ctr_negative_for_a_user_with_one_never_seen_item():
    """A user who interacted with all items but one: every sampled CTR negative of theirs is that item."""
    log = [("1", str(i), 5.0, i, None) for i in range(1, 12)]  # 11 of 12 items, all clicks
    data, prompts = build(tasks=["ctr"], log=log, catalogue=[str(i) for i in range(1, 13)])
    sampled = [r for t in prompts.tables.values() for r in t.to_pylist() if r["label"] == 0.0]
    assert len(sampled) == 11 and {data.raw_item_ids[r["target_item_ids"][0]] for r in sampled} == {"12"}


def test_negative_sampler_names_the_user_short_of_negatives():
    log = [("1", str(i), 4.0, i, None) for i in range(1, 10)] + [("2", "1", 4.0, 1, None)]
    data = build_canonical(raw_data(log, [str(i) for i in range(1, 13)]), DataConfig())
    sampler = NegativeSampler(data)
    with pytest.raises(ValueError, match=r"^user '1' interacted with 9 of 12 items: fewer than the 4 never-interacted "
                                         r"negatives needed \(lower data.num_candidates\)$"):
        sampler.sample(np.random.default_rng(0), np.array([1, 0]), 4)  # user 2 (id 1) is fine, user 1 (id 0) is short


@pytest.mark.parametrize("seen", [(2, 3, 4), (2, 3, 4, 5, 7, 9, 10, 11, 12)])
def test_negative_sampler_is_uniform_over_the_never_interacted_items(seen):
    """Every never-interacted item (the first item of the catalogue too) equally often: 30000 draws, +-5 sd."""
    log = [("1", str(i), 4.0, i, None) for i in seen]
    data = build_canonical(raw_data(log, [str(i) for i in range(1, 13)]), DataConfig())
    draws = NegativeSampler(data).sample(np.random.default_rng(3), np.zeros(30000, dtype=np.int64), 1)[:, 0]
    freq = Counter(data.raw_item_ids[i] for i in draws.tolist())
    never = {str(i) for i in range(1, 13)} - {str(i) for i in seen}
    assert set(freq) == never
    p = 1 / len(never)
    sd = (p * (1 - p) / 30000) ** 0.5
    assert all(abs(n / 30000 - p) < 5 * sd for n in freq.values()), freq
