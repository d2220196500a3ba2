"""Source converters of ``ckf_dist.data.prepare``: Amazon reviews (2014 zip, 2018 gz + metadata), RecBole atomic
(Games-6k history lists, plain form), MovieLens-1M format, generic CSV/parquet; bad-row reports; the review
sentence; the review_rating task; no target leakage into histories."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ckf_dist.config import DEFAULT_TASKS, ConfigError, load_config
from ckf_dist.data import schema
from ckf_dist.data.prepare import prepare
from ckf_dist.data.raw import RawData, read_source, review_sentence, sample_users
from tests.conftest import shared_dataset

ALL_TASKS = "data.tasks=[ctr,topk,rating,explanation,review_rating,next_item]"


def _read(root, sub):
    return pads.dataset(f"{root}/{sub}", format="parquet").to_table()


def _silent(_message: str) -> None:
    """A progress callback that drops the lines."""


def _cfg(source, raw_path, out, *extra):
    return load_config([f"data.path={out}", f"data.source={source}", f"data.raw_path={raw_path}", *extra])


def _check_prompts(root, manifest):
    """Schema, placeholder counts per task and strictly-earlier histories, for every split."""
    inter = _read(root, "interactions")
    ts = {(u, i): t for u, i, t in zip(*(inter.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp")))}
    tasks_seen = set()
    for split in schema.SPLITS:
        table = _read(root, f"prompts/{split}")
        assert table.schema.equals(schema.PROMPTS_SCHEMA) and table.num_rows == manifest["prompt_rows_per_split"][split]
        for r in table.to_pylist():
            tasks_seen.add(r["task"])
            assert r["task_id"] == schema.TASK_IDS[r["task"]]
            targets = {"topk": manifest["data_config"]["num_candidates"], "next_item": 0}.get(r["task"], 1)
            assert len(r["target_item_ids"]) == targets
            want = schema.expected_placeholders(targets)
            assert r["prompt_hybrid"].count(schema.PLACEHOLDER) == want and schema.PLACEHOLDER not in r["prompt_text"]
            pos = {"topk": lambda: r["target_item_ids"][int(r["label"])],
                   "next_item": lambda: int(r["label"])}.get(r["task"], lambda: r["target_item_ids"][0])()
            if (r["user_id"], pos) in ts:
                assert all(ts[(r["user_id"], h)] < ts[(r["user_id"], pos)] for h in r["history_item_ids"])
    return tasks_seen


# ----------------------------------------------------------------------------------------- review sentence / config


def test_review_sentence_rules():
    assert review_sentence("Great! It works as it should. Buy it.") == "It works as it should."
    # a missing space after the period still splits
    assert review_sentence("Cheap and good.It does what it says on the box.") == "It does what it says on the box."
    assert review_sentence("Great! Love it.") == "Great! Love it."  # nothing long enough: the whole (short) review
    assert review_sentence("  one two   three four five  ", 2, 3) == "one two three"
    assert review_sentence(None) is None and review_sentence("   ") is None


def test_config_sources_and_default_tasks():
    assert "review_rating" in schema.TASK_IDS and "review_rating" not in load_config([]).data.tasks
    assert list(load_config([]).data.tasks) == list(DEFAULT_TASKS)
    for src in ("movielens-1m", "amazon-reviews", "recbole", "generic"):
        assert load_config([f"data.source={src}", "data.raw_path=x"]).data.source == src
    with pytest.raises(ConfigError, match="data.source"):
        load_config(["data.source=amazon", "data.raw_path=x"])
    with pytest.raises(ConfigError, match="column_map key"):
        load_config(["data.source=generic", "data.raw_path=x", "data.column_map={usr: u}"])
    with pytest.raises(ConfigError, match="max_users"):
        load_config(["data.max_users=-1"])


# ----------------------------------------------------------------------------------------- Amazon


@pytest.fixture(scope="module")
def amazon_mi(tmp_path_factory):
    raw = shared_dataset("amazon-musical-instruments") / "Musical_Instruments.zip"
    out = str(tmp_path_factory.mktemp("mi") / "data")
    cfg = _cfg("amazon-reviews", raw, out, ALL_TASKS)
    lines: list[str] = []
    manifest = prepare(cfg, progress=lines.append)
    return cfg, out, manifest, lines


def test_amazon_musical_instruments_counts_and_tasks(amazon_mi):
    cfg, out, manifest, lines = amazon_mi
    assert manifest["num_interactions"] == 10_261 and manifest["num_users"] == 1_429 and manifest["num_items"] == 900
    assert manifest["bad_rows"]["total"] == 0 and manifest["skipped_tasks"] == {}
    assert manifest["source_files"][0].endswith("Musical_Instruments.zip:Musical_Instruments.json")
    assert manifest["num_items_fallback_title"] == 900
    assert any("no metadata file" in n for n in manifest["source_notes"]) and any("note:" in ln for ln in lines)
    assert _read(out, "items").column("title")[0].as_py().startswith("item ")
    for split in schema.SPLITS:
        assert set(manifest["prompts"][split]) == set(schema.TASK_IDS) and manifest["prompts"][split]["explanation"] > 0
    assert _check_prompts(out, manifest) == set(schema.TASK_IDS)


def test_amazon_answers_come_from_the_review(amazon_mi):
    cfg, out, manifest, _ = amazon_mi
    raw = read_source(cfg.data)
    review = {(u, i): " ".join((t or "").split()) for u, i, t in zip(*(raw.interactions.column(c).to_pylist()
                                                                     for c in ("raw_user_id", "raw_item_id", "review")))}
    rating = dict(zip(zip(raw.interactions.column("raw_user_id").to_pylist(), raw.interactions.column("raw_item_id").to_pylist()),
                      raw.interactions.column("rating").to_pylist()))
    users = _read(out, "users").column("raw_user_id").to_pylist()
    items = _read(out, "items").column("raw_item_id").to_pylist()
    test = _read(out, "prompts/test")
    expl = test.filter(pc.equal(pc.field("task"), "explanation")).to_pylist()
    assert len(expl) > 1000
    for r in expl:
        key = (users[r["user_id"]], items[r["target_item_ids"][0]])
        assert r["answer"] and r["answer"] in review[key]
        assert r["answer"] == review_sentence(review[key], cfg.data.review_min_words, cfg.data.review_max_words)
    rr = test.filter(pc.equal(pc.field("task"), "review_rating")).to_pylist()
    assert len(rr) == len(expl)
    for r in rr:
        key = (users[r["user_id"]], items[r["target_item_ids"][0]])
        assert r["answer"] == str(int(rating[key])) == str(int(r["label"]))
        assert r["prompt_hybrid"].startswith(f"The user {schema.PLACEHOLDER} wrote about ")
        assert r["prompt_hybrid"].endswith("'. What rating did the user give? Answer 1 to 5.")


def _review(user, asin, rating, ts, text, **extra):
    return json.dumps({"reviewerID": user, "asin": asin, "overall": rating, "unixReviewTime": ts,
                       "reviewText": text, "summary": "short", **extra})


def test_amazon_2018_gz_meta_and_bad_rows(tmp_path):
    lines = []
    for u in range(6):
        for k in range(4):
            lines.append(_review(f"U{u}", f"B{(u + k) % 10:03d}", 1 + (u + k) % 5, 1_500_000_000 + 86400 * k,
                                 f"Fine. This product number {k} works well for me. Second sentence here.",
                                 vote="3", style={"Size:": " Large"}, verified=True))
    lines[3] = lines[3].replace('"reviewText": "Fine. This', '"reviewText": "", "x": "')  # empty text -> summary
    good = len(lines)
    lines += ['{"reviewerID": "U9", "asin": ', json.dumps({"reviewerID": "U9", "asin": "B001"}),
              _review("U9", "B001", 7.0, 1, "too high"), _review("U9", "B001", 4.0, "yesterday", "bad time"),
              lines[0], "[1, 2]"]
    (tmp_path / "reviews_2018.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    meta = ["{'asin': 'B000', 'title': 'Guitar &amp; Strap', 'price': 3.5}",  # 2014 Python-literal style
            json.dumps({"asin": "B001", "title": "Tuner"}), json.dumps({"asin": "B999", "title": "Unused"}),
            "{'asin': 'B002', 'title': oops"]
    (tmp_path / "meta_Test.json").write_text("\n".join(meta) + "\n")
    out = tmp_path / "out"
    manifest = prepare(_cfg("amazon-reviews", tmp_path, out, f"data.meta_path={tmp_path / 'meta_Test.json'}", ALL_TASKS),
                       progress=_silent)
    assert manifest["num_interactions"] == good and manifest["num_items"] == 9 and manifest["num_users"] == 6
    bad = manifest["bad_rows"]
    assert bad["by_reason"] == {"bad JSON": 1, "missing field": 1, "rating outside 1-5": 1, "bad timestamp": 1,
                                "duplicate (reviewerID, asin)": 1, "not a JSON object": 1, "bad metadata line": 1}
    ex = {(e["file"].rsplit("/", 1)[-1], e["line"]) for e in bad["examples"]}
    assert {("reviews_2018.jsonl.gz", good + k) for k in range(1, 7)} <= ex and ("meta_Test.json", 4) in ex
    titles = dict(zip(*(_read(out, "items").column(c).to_pylist() for c in ("raw_item_id", "title"))))
    assert titles["B000"] == "Guitar & Strap" and titles["B001"] == "Tuner" and titles["B002"] == "item B002"
    assert manifest["num_items_fallback_title"] == 7 and "7 of 9 items have no title" in manifest["source_notes"][0]
    expl = [r for s in schema.SPLITS for r in _read(out, f"prompts/{s}").to_pylist() if r["task"] == "explanation"]
    assert {r["answer"] for r in expl} <= {f"This product number {k} works well for me." for k in range(4)} | {"short"}
    _check_prompts(str(out), manifest)


def test_amazon_missing_reviews_skip_tasks(tmp_path):
    rows = [json.dumps({"reviewerID": f"U{u}", "asin": f"A{(u + k) % 9}", "overall": 4.0, "unixReviewTime": 10 * k})
            for u in range(5) for k in range(4)]
    (tmp_path / "r.json").write_text("\n".join(rows))
    manifest = prepare(_cfg("amazon-reviews", tmp_path / "r.json", tmp_path / "o", ALL_TASKS), progress=_silent)
    assert set(manifest["skipped_tasks"]) == {"explanation", "review_rating"}
    assert "review text" in manifest["skipped_tasks"]["review_rating"]
    assert set(manifest["tasks"]) == {"ctr", "topk", "rating", "next_item"}


# ----------------------------------------------------------------------------------------- RecBole / Games-6k


def _inter_file(path):
    out = {}
    for line in path.read_text().splitlines()[1:]:
        u, hist, target = line.split("\t")
        out[u] = (hist.split(), target)
    return out


def test_games6k_full_counts_match_files_and_sampling_is_deterministic():
    folder = shared_dataset("games-6k")
    raw = read_source(_cfg("recbole", folder, "/nonexistent", "data.max_users=0").data)
    test = _inter_file(folder / "Games-6k.test.inter")
    assert raw.interactions.num_rows == sum(len(h) + 1 for h, _ in test.values()) == 440_264
    assert len(pc.unique(raw.interactions.column("raw_user_id"))) == len(test) == 50_546
    assert raw.items.num_rows == 16_859 and raw.bad_rows.total == 0 and not raw.has_ratings
    copy = lambda: RawData(raw.source, raw.interactions, raw.items)  # noqa: E731
    a, b = sample_users(copy(), 300, 0), sample_users(copy(), 300, 0)
    assert a.interactions.equals(b.interactions) and len(pc.unique(a.interactions.column("raw_user_id"))) == 300
    c = sample_users(RawData(raw.source, raw.interactions.take(pa.array(np.arange(raw.interactions.num_rows)[::-1])),
                             raw.items), 300, 0)  # independent of row order
    assert set(c.interactions.column("raw_user_id").to_pylist()) == set(a.interactions.column("raw_user_id").to_pylist())
    assert set(sample_users(copy(), 300, 1).interactions.column("raw_user_id").to_pylist()) != \
        set(a.interactions.column("raw_user_id").to_pylist())


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    folder = shared_dataset("games-6k")
    out = str(tmp_path_factory.mktemp("games") / "data")
    return folder, out, prepare(_cfg("recbole", folder, out, "data.max_users=1500"), progress=_silent)


def test_games6k_sample_split_is_the_files_split(games):
    folder, out, manifest = games
    assert manifest["num_users"] == 1500 and manifest["num_items"] == 16_859
    assert "rating" in manifest["skipped_tasks"] and "explanation" in manifest["skipped_tasks"]
    assert any("max_users=1500" in n for n in manifest["source_notes"])
    test, valid = _inter_file(folder / "Games-6k.test.inter"), _inter_file(folder / "Games-6k.valid.inter")
    users = _read(out, "users").column("raw_user_id").to_pylist()
    items = _read(out, "items").column("raw_item_id").to_pylist()
    assert manifest["num_interactions"] == sum(len(test[u][0]) + 1 for u in users)
    inter = _read(out, "interactions").to_pandas()
    by_split = {s: {users[u]: items[i] for u, i in zip(g["user_id"], g["item_id"])} for s, g in inter.groupby("split")}
    assert by_split["test"] == {u: test[u][1] for u in users}
    assert by_split["valid"] == {u: valid[u][1] for u in users}
    ts = {(u, i): t for u, i, t in zip(inter["user_id"], inter["item_id"], inter["timestamp"])}
    hlen = manifest["data_config"]["history_len"]
    topk = _read(out, "prompts/test").filter(pc.equal(pc.field("task"), "topk")).to_pylist()
    assert len(topk) == 1500
    for r in topk:  # the held-out target: the test item; its history: the items before it, never itself
        u, target = users[r["user_id"]], r["target_item_ids"][int(r["label"])]
        assert items[target] == test[u][1]
        assert [items[h] for h in r["history_item_ids"]] == test[u][0][-hlen:]
        assert target not in r["history_item_ids"]
        assert all(ts[(r["user_id"], h)] < ts[(r["user_id"], target)] for h in r["history_item_ids"])


def test_recbole_bad_rows_and_plain_form(tmp_path):
    seq = tmp_path / "seq"
    seq.mkdir()
    (seq / "T.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"{i}\tGame {i}\n" for i in range(20))
                                + "3\tDuplicate\n")
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (seq / "T.valid.inter").write_text(header + "a\t0 1 2\t3\nb\t4 5 6\t7\nc\t8 9\t10\nd\t1 2 3\t4\n")
    (seq / "T.test.inter").write_text(header + "a\t0 1 2 3\t11\nb\t4 5 6 99\t12\nc\t9 8 10\t13\nd\t1 2 3 4\n")
    manifest = prepare(_cfg("recbole", seq, tmp_path / "o1"), progress=_silent)
    bad = manifest["bad_rows"]
    assert bad["by_reason"] == {"duplicate item id": 1, "unknown item id": 1, "inconsistent history": 1,
                                "wrong field count": 1}
    where = {(e["file"].rsplit("/", 1)[-1], e["line"]) for e in bad["examples"]}
    assert where == {("T.item", 22), ("T.test.inter", 3), ("T.test.inter", 4), ("T.test.inter", 5)}
    # a: full test line kept; b: test line dropped (unknown 99) -> valid sequence; c: valid kept (inconsistent)
    assert manifest["num_interactions"] == 5 + 4 + 3 + 4
    with pytest.raises(ValueError, match="data.test_per_user"):
        prepare(_cfg("recbole", seq, tmp_path / "o2", "data.test_per_user=2"), progress=_silent)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "P.inter").write_text("uid:token\tiid:token\trating:float\ttimestamp:float\n"
                                   + "".join(f"{u}\t{(3 * u + k) % 12}\t{1 + k % 5}\t{100 + k}\n" for u in range(4) for k in range(5))
                                   + "0\t1\t9\t5\n0\t2\t3\tnow\n")
    manifest = prepare(_cfg("recbole", plain, tmp_path / "o3", "data.column_map={user: uid, item: iid}"), progress=_silent)
    assert manifest["num_interactions"] == 20 and manifest["bad_rows"]["by_reason"] == {
        "rating outside 1-5": 1, "bad timestamp": 1}
    assert any("no .item file" in n for n in manifest["source_notes"]) and "rating" in manifest["prompts"]["train"]
    _check_prompts(str(tmp_path / "o3"), manifest)


# ----------------------------------------------------------------------------------------- MovieLens-1M format


def test_movielens_1m_format(tmp_path):
    src = shared_dataset("ml-100k")
    rows = [ln.split("\t") for ln in (src / "u.data").read_text().splitlines()]
    rows = [r for r in rows if int(r[0]) <= 60]
    raw = tmp_path / "ml-1m"
    raw.mkdir()
    movies = []
    for line in (src / "u.item").read_bytes().decode("latin-1").splitlines():
        f = line.split("|")
        movies.append(f"{f[0]}::{f[1]}::Comedy|Drama")
    movies += ["9998::Amélie (2001)::Comedy|Romance", "9999::Only Two Fields"]
    (raw / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    rows.append(["1", "9998", "5", "881250950"])
    ratings = [f"{u}::{i}::{r}::{t}" for u, i, r, t in rows] + ["1::2::6::881250949", "1::77777::4::881250949",
                                                                "x::1::4::881250949"]
    (raw / "ratings.dat").write_text("\n".join(ratings) + "\n")
    manifest = prepare(_cfg("movielens-1m", raw, tmp_path / "out", "data.tasks=[ctr,rating]"), progress=_silent)
    assert manifest["source"] == "movielens-1m" and manifest["num_interactions"] == len(rows)
    assert manifest["num_users"] == 60 and manifest["num_items"] == 1683
    bad = manifest["bad_rows"]
    assert bad["by_reason"] == {"wrong field count": 1, "rating outside 1-5": 1, "unknown item id": 1, "non-integer id": 1}
    lines = {(e["file"].rsplit("/", 1)[-1], e["line"]) for e in bad["examples"]}
    assert lines == {("movies.dat", 1684)} | {("ratings.dat", len(rows) + k) for k in (1, 2, 3)}
    assert any("movies.dat" in e["reason"] for e in bad["examples"] if e["reason"].startswith("item id 77777"))
    items = _read(tmp_path / "out", "items").to_pylist()
    assert items[0]["title"] == "Toy Story (1995)"
    assert items[-1] == {"item_id": 1682, "raw_item_id": "9998", "title": "Amélie (2001)"}  # latin-1 decoded
    _check_prompts(str(tmp_path / "out"), manifest)


# ----------------------------------------------------------------------------------------- generic CSV / parquet


def test_generic_csv_renamed_columns_and_bad_rows(tmp_path):
    header = "uid;movie;stars;when;name;text"
    body = [f"u{u};m{(u * 3 + k) % 12};{1 + (u + k) % 5};{1_600_000_000 + 3600 * k};Film {(u * 3 + k) % 12};"
            f"I watched film number {k} and enjoyed it a lot." for u in range(8) for k in range(6)]
    body[5] = body[5].replace(f";{1_600_000_000 + 3600 * 5};", ";2020-09-13T17:26:40Z;")  # ISO timestamp
    good = len(body)
    body += ["u1;m1;4", "", "u1;;4;1600000000;x;y", "u1;m2;0;1600000000;x;y", "u1;m2;4;soon;x;y"]
    (tmp_path / "log.csv").write_text("\n".join([header] + body) + "\n")
    cmap = "data.column_map={user: uid, item: movie, rating: stars, timestamp: when, title: name, review: text}"
    out = tmp_path / "out"
    manifest = prepare(_cfg("generic", tmp_path / "log.csv", out, cmap, "data.csv_delimiter=;", ALL_TASKS),
                       progress=_silent)
    assert manifest["num_interactions"] == good and manifest["num_users"] == 8 and manifest["num_items"] == 12
    assert manifest["bad_rows"]["by_reason"] == {"wrong field count": 1, "empty line": 1, "missing field": 1,
                                                 "rating outside 1-5": 1, "bad timestamp": 1}
    assert sorted(e["line"] for e in manifest["bad_rows"]["examples"]) == [good + k for k in range(2, 7)]
    assert all(e["file"].endswith("log.csv") for e in manifest["bad_rows"]["examples"])
    inter = _read(out, "interactions")
    assert 1_600_000_000 in inter.column("timestamp").to_pylist()  # the ISO row
    titles = _read(out, "items").column("title").to_pylist()
    assert titles[0] == "Film 0" and manifest["num_items_fallback_title"] == 0
    assert set(manifest["tasks"]) == set(schema.TASK_IDS)
    _check_prompts(str(out), manifest)
    with pytest.raises(ValueError, match="data.column_map.user"):
        prepare(_cfg("generic", tmp_path / "log.csv", tmp_path / "o2", "data.csv_delimiter=;"), progress=_silent)


def test_generic_parquet_labels_and_items_file(tmp_path):
    n_users, per = 10, 6
    users = [f"user-{u}" for u in range(n_users) for _ in range(per)]
    items = [f"it{(u * 2 + k) % 15}" for u in range(n_users) for k in range(per)]
    labels = [1 if k % 3 else 0 for _ in range(n_users) for k in range(per)]
    times = pa.array([1_700_000_000_000 + 60_000 * k for _ in range(n_users) for k in range(per)], pa.timestamp("ms"))
    pq.write_table(pa.table({"U": users, "I": items, "clicked": labels, "at": times}), tmp_path / "log.parquet")
    pq.write_table(pa.table({"I": [f"it{i}" for i in range(20)], "name": [f"Thing {i}" for i in range(20)]}),
                   tmp_path / "items.parquet")
    cmap = "data.column_map={user: U, item: I, label: clicked, timestamp: at, title: name}"
    out = tmp_path / "out"
    manifest = prepare(_cfg("generic", tmp_path / "log.parquet", out, cmap,
                            f"data.meta_path={tmp_path / 'items.parquet'}"), progress=_silent)
    assert manifest["num_interactions"] == sum(labels) and manifest["num_items"] == 20
    assert any("label-0 rows" in n for n in manifest["source_notes"])
    assert set(manifest["skipped_tasks"]) == {"rating", "explanation"}
    inter = _read(out, "interactions")
    assert pc.min(inter.column("timestamp")).as_py() >= 1_700_000_000
    assert _read(out, "items").column("title").to_pylist()[:2] == ["Thing 0", "Thing 1"]
    _check_prompts(str(out), manifest)
