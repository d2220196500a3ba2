"""Unit tests of the shared preparation steps: ids, time split, history windows, negatives, prompt rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ckf_dist.config import DataConfig
from ckf_dist.data import synthetic
from ckf_dist.data.canonical import build_canonical
from ckf_dist.data.prompts import NegativeSampler, build_prompts, check_placeholders
from ckf_dist.data.raw import RAW_INTERACTIONS_SCHEMA, RAW_ITEMS_SCHEMA, RawData
from ckf_dist.data.schema import PLACEHOLDER, PROMPTS_SCHEMA, SPLITS, TASK_IDS, expected_placeholders


def _raw(rows, items=None, source="handmade") -> RawData:
    """rows: (user, item, rating or None, timestamp, review or None)."""
    cols = list(zip(*rows))
    inter = pa.table({"raw_user_id": pa.array(cols[0], pa.string()), "raw_item_id": pa.array(cols[1], pa.string()),
                      "rating": pa.array(cols[2], pa.float32()), "timestamp": pa.array(cols[3], pa.int64()),
                      "review": pa.array(cols[4], pa.string())}, schema=RAW_INTERACTIONS_SCHEMA)
    items = items or sorted({r[1] for r in rows}, key=int)
    items_t = pa.table({"raw_item_id": pa.array(items, pa.string()),
                        "title": pa.array([f"movie {i}" for i in items], pa.string())}, schema=RAW_ITEMS_SCHEMA)
    return RawData(source=source, interactions=inter, items=items_t).validate()


@pytest.fixture(scope="module")
def small():
    cfg = DataConfig(num_users=60, num_items=80, num_clusters=3, interactions_per_user=12, seed=3)
    raw = synthetic.read(cfg)
    data = build_canonical(raw, cfg)
    return cfg, raw, data, build_prompts(data, cfg, raw.has_ratings, raw.has_reviews, raw.source)


def test_ids_are_sorted_raw_ids_numeric_when_integer():
    raw = _raw([("10", "5", 4.0, 3, None), ("9", "40", 2.0, 1, None), ("10", "100", 5.0, 2, None)],
               items=["100", "5", "40", "7"])
    data = build_canonical(raw, DataConfig())
    assert data.raw_user_ids == ["9", "10"]  # numeric, not lexicographic
    assert data.raw_item_ids == ["5", "7", "40", "100"]  # whole catalogue, including never-seen "7"
    assert data.titles == ["movie 5", "movie 7", "movie 40", "movie 100"]
    # user "10" (id 1): rows sorted by time -> item 100 (t=2) then item 5 (t=3)
    assert data.user.tolist() == [0, 1, 1] and data.item.tolist() == [2, 3, 0]


def test_split_rule_for_short_users():
    rows = [("1", "1", 5.0, 1, None)]  # n=1: train only
    rows += [("2", str(i), 3.0, i, None) for i in (1, 2)]  # n=2: train, test
    rows += [("3", str(i), 3.0, i, None) for i in (1, 2, 3)]  # n=3: train, valid, test
    rows += [("4", str(i), 3.0, i, None) for i in range(1, 5)]  # n=4: train, valid, test, test
    rows += [("5", str(i), 3.0, i, None) for i in range(1, 8)]  # n=7, T=2: 3 train, 2 valid, 2 test
    data = build_canonical(_raw(rows), DataConfig(test_per_user=2))
    by_user = [data.split[data.user_start[u]:data.user_start[u + 1]].tolist() for u in range(5)]
    assert by_user[0] == [0]
    assert by_user[1] == [0, 2]
    assert by_user[2] == [0, 1, 2]
    assert by_user[3] == [0, 1, 2, 2]
    assert by_user[4] == [0, 0, 0, 1, 1, 2, 2]
    assert data.is_cold_user.tolist() == [True, True, True, True, False]  # <= 5 interactions


def test_history_excludes_same_timestamp_and_is_capped():
    rows = [("1", str(i), 4.0, t, None) for i, t in zip(range(1, 9), (10, 20, 20, 30, 40, 50, 60, 60))]
    data = build_canonical(_raw(rows), DataConfig(history_len=3))
    spans = list(zip(data.hist_start.tolist(), data.hist_end.tolist()))
    assert spans[0] == (0, 0)
    assert spans[1] == spans[2] == (0, 1)  # the two t=20 rows do not see each other
    assert spans[4] == (1, 4)  # last 3 before t=40
    assert spans[6] == spans[7] == (3, 6)


def test_no_leakage_history_strictly_before_target(small):
    cfg, _, data, prompts = small
    ts = {(u, i): t for u, i, t in zip(data.user.tolist(), data.item.tolist(), data.timestamp.tolist())}
    for split in SPLITS:
        table = prompts.tables[split]
        for row in table.select(["user_id", "task", "history_item_ids", "target_item_ids", "label"]).to_pylist():
            if row["task"] == "topk":
                target = row["target_item_ids"][int(row["label"])]
            elif row["task"] == "ctr" and (row["user_id"], row["target_item_ids"][0]) not in ts:
                continue  # sampled negative: never interacted; its anchor's history is checked via positives
            else:
                target = row["target_item_ids"][0]
            t_target = ts[(row["user_id"], target)]
            assert len(row["history_item_ids"]) <= cfg.history_len
            assert all(ts[(row["user_id"], h)] < t_target for h in row["history_item_ids"])


def test_placeholders_and_text_form(small):
    _, _, _, prompts = small
    for table in prompts.tables.values():
        assert table.schema.equals(PROMPTS_SCHEMA)
        for row in table.to_pylist():
            assert row["prompt_hybrid"].count(PLACEHOLDER) == expected_placeholders(len(row["target_item_ids"]))
            assert row["prompt_hybrid"].startswith(f"The user {PLACEHOLDER} ")
            assert row["prompt_text"] == row["prompt_hybrid"].replace(" " + PLACEHOLDER, "")
            assert row["task_id"] == TASK_IDS[row["task"]]


def test_check_placeholders_names_the_sample(small):
    table = small[3].tables["train"].slice(0, 5)
    broken = table.set_column(table.schema.get_field_index("prompt_hybrid"), "prompt_hybrid",
                              pa.array(["The user <cf> x"] * 5, pa.string()))
    sid = broken.column("sample_id")[0].as_py()
    with pytest.raises(ValueError, match=sid):
        check_placeholders(broken)


def test_task_labels_answers_and_negatives(small):
    cfg, _, data, prompts = small
    seen = set(zip(data.user.tolist(), data.item.tolist()))
    titles = data.titles
    for split, table in prompts.tables.items():
        rows = table.to_pylist()
        ctr = [r for r in rows if r["task"] == "ctr"]
        assert ctr and abs(np.mean([r["label"] for r in ctr]) - 0.5) < 0.1  # balanced by sampled negatives
        for r in rows:
            if r["task"] == "ctr":
                assert r["answer"] == ("Yes" if r["label"] == 1 else "No")
            elif r["task"] == "topk":
                cands = r["target_item_ids"]
                assert len(cands) == cfg.num_candidates == len(set(cands))
                pos = cands[int(r["label"])]
                assert r["answer"] == titles[pos] and (r["user_id"], pos) in seen
                assert all((r["user_id"], c) not in seen for i, c in enumerate(cands) if i != int(r["label"]))
            elif r["task"] == "rating":
                assert r["answer"] == str(int(r["label"])) and 1 <= r["label"] <= 5
            else:
                assert r["label"] == -1 and r["answer"].startswith("a ")
        assert prompts.counts[split]["topk"] == int((data.split == SPLITS.index(split)).sum())


def test_negative_sampler_dense_user_falls_back_and_short_user_raises():
    rows = [("1", str(i), 4.0, i, None) for i in range(1, 10)] + [("2", "1", 4.0, 1, None)]
    data = build_canonical(_raw(rows, items=[str(i) for i in range(1, 13)]), DataConfig())
    sampler = NegativeSampler(data)
    out = sampler.sample(np.random.default_rng(0), np.zeros(50, dtype=np.int64), 3)  # only 3 unseen items
    assert {tuple(sorted(r)) for r in out.tolist()} == {(9, 10, 11)}
    with pytest.raises(ValueError, match="'1'.*num_candidates"):
        sampler.sample(np.random.default_rng(0), np.array([0]), 4)


def test_implicit_feedback_skips_rating_and_explanation():
    rows = [(str(u), str(i), None, i, None) for u in range(1, 4) for i in range(1, 7)]
    raw = _raw(rows, items=[str(i) for i in range(1, 20)])
    cfg = DataConfig(num_candidates=3)
    prompts = build_prompts(build_canonical(raw, cfg), cfg, raw.has_ratings, raw.has_reviews, raw.source)
    assert set(prompts.skipped_tasks) == {"rating", "explanation"}
    train = prompts.tables["train"].to_pylist()
    assert {r["task"] for r in train} == {"ctr", "topk"}
    labels = [r["label"] for r in train if r["task"] == "ctr"]
    assert labels.count(1.0) == labels.count(0.0) == 12  # every interaction positive + one negative each


def test_deterministic_and_task_independent(small):
    cfg, raw, data, prompts = small
    again = build_prompts(build_canonical(synthetic.read(cfg), cfg), cfg, True, True, "synthetic")
    for split in SPLITS:
        assert again.tables[split].equals(prompts.tables[split])
    only_topk = DataConfig(**{**cfg.__dict__, "tasks": ["topk"]})
    sub = build_prompts(data, only_topk, True, True, "synthetic").tables["train"]
    full = prompts.tables["train"]
    key = lambda t: sorted(zip(t.column("sample_id").to_pylist(), t.column("target_item_ids").to_pylist()))
    assert key(sub) == key(full.filter(pa.compute.equal(full.column("task"), "topk")))


def test_synthetic_titles_short_and_unique():
    raw = synthetic.read(DataConfig())
    titles = raw.items.column("title").to_pylist()
    assert len(set(titles)) == len(titles)
    assert all(2 <= len(t.split()) <= 3 for t in titles)


def test_fractional_ratings_are_written_exactly(tmp_path):
    """A generic CSV with ratings 3.5, 4 and 2.75: the rating and review_rating answers and the "rated:" history
    carry the exact rating ("3.5", "4", "2.75"), the same value as the label, never a truncated "3"."""
    import pyarrow.dataset as pads

    from ckf_dist.config import load_config
    from ckf_dist.data.prepare import prepare

    ratings = ("3.5", "4", "2.75")
    lines = ["user,item,stars,when,name,text"]
    lines += [f"u{u},m{(u * 2 + k) % 12},{ratings[(u + k) % 3]},{1_600_000_000 + 3600 * k},Film {(u * 2 + k) % 12},"
              f"I watched film number {k} and liked it a lot." for u in range(5) for k in range(6)]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    prepare(load_config([f"data.path={out}", "data.source=generic", f"data.raw_path={tmp_path / 'log.csv'}",
                         "data.column_map={user: user, item: item, rating: stars, timestamp: when, title: name, "
                         "review: text}", "data.tasks=[ctr,topk,rating,explanation,review_rating]"]),
            progress=lambda m: None)
    read = lambda sub: pads.dataset(f"{out}/{sub}", format="parquet").to_table()  # noqa: E731
    inter = read("interactions").to_pydict()
    rated = {(u, i): r for u, i, r in zip(inter["user_id"], inter["item_id"], inter["rating"])}
    titles = dict(zip(*read("items").select(["item_id", "title"]).to_pydict().values()))
    text = {3.5: "3.5", 4.0: "4", 2.75: "2.75"}
    answers, histories = set(), 0
    for split in SPLITS:
        for r in read(f"prompts/{split}").to_pylist():
            if r["task"] not in ("rating", "review_rating"):
                continue
            assert r["answer"] == text[r["label"]], r
            answers.add((r["answer"], r["label"]))
            if r["task"] == "rating" and r["history_item_ids"]:
                clauses = [f"{titles[h]}: {text[rated[(r['user_id'], h)]]}" for h in r["history_item_ids"]]
                assert r["prompt_hybrid"].startswith(f"The user {PLACEHOLDER} rated: " + "; ".join(clauses) + ". ")
                histories += 1
    assert {("3.5", 3.5), ("4", 4.0), ("2.75", 2.75)} <= answers and histories > 0


def test_an_unknown_task_is_named_before_any_prompt_is_built():
    rows = [(str(u), str(i), 4.0, i, None) for u in range(1, 4) for i in range(1, 7)]
    raw = _raw(rows, items=[str(i) for i in range(1, 20)])
    cfg = DataConfig(num_candidates=3, tasks=["ctr", "bogus"])
    with pytest.raises(ValueError, match=r"data.tasks: unknown task 'bogus'; known: \['ctr', 'explanation', "):
        build_prompts(build_canonical(raw, cfg), cfg, raw.has_ratings, raw.has_reviews, raw.source)
