"""End-to-end tests of ``ckf_dist.data.prepare``: synthetic, MovieLens-100K (shared folder), bad rows, S3."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from ckf_dist.config import DEFAULT_TASKS, load_config
from ckf_dist.data import schema
from ckf_dist.data.io import get_filesystem
from ckf_dist.data.prepare import FORMAT_VERSION, is_prepared, main, prepare
from ckf_dist.data.synthetic import genre_name
from tests.conftest import shared_dataset


def _read(root, sub, fs=None):
    return pads.dataset(f"{root}/{sub}", format="parquet", filesystem=fs).to_table()


def _silent(_message: str) -> None:
    """A progress callback that drops the lines."""


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn") / "data")
    cfg = load_config([f"data.path={root}"])
    lines: list[str] = []
    manifest = prepare(cfg, progress=lines.append)
    return cfg, root, manifest, lines


def test_synthetic_schemas_and_manifest(synthetic_set):
    cfg, root, manifest, lines = synthetic_set
    assert _read(root, "users").schema.equals(schema.USERS_SCHEMA)
    assert _read(root, "items").schema.equals(schema.ITEMS_SCHEMA)
    assert _read(root, "interactions").schema.equals(schema.INTERACTIONS_SCHEMA)
    for split in schema.SPLITS:
        table = _read(root, f"prompts/{split}")
        assert table.schema.equals(schema.PROMPTS_SCHEMA)
        assert table.num_rows == manifest["prompt_rows_per_split"][split] == sum(manifest["prompts"][split].values())
        assert sorted(manifest["prompts"][split]) == sorted(DEFAULT_TASKS)  # review_rating is opt-in
        assert pc.all(pc.equal(table.column("split"), split)).as_py()
        assert len(set(table.column("sample_id").to_pylist())) == table.num_rows
    on_disk = json.loads(open(f"{root}/{schema.MANIFEST}").read())
    assert on_disk == manifest and manifest["format_version"] == FORMAT_VERSION == 1
    assert manifest["num_users"] == cfg.data.num_users and manifest["num_items"] == cfg.data.num_items
    assert manifest["source"] == "synthetic" and manifest["bad_rows"]["total"] == 0
    assert manifest["data_config"]["num_users"] == cfg.data.num_users and "created_at" in manifest
    assert "secret_access_key" not in manifest["data_config"]["s3"]
    assert sum(manifest["prompt_rows_per_split"].values()) < 40_000  # keeps the CPU default small
    assert any(line.startswith("[prepare] prompts:") and "s)" in line for line in lines)
    assert is_prepared(root) and not is_prepared(root + "-missing")


def test_synthetic_split_and_cold_flags(synthetic_set):
    cfg, root, manifest, _ = synthetic_set
    users = _read(root, "users").to_pandas().set_index("user_id")
    inter = _read(root, "interactions").to_pandas()
    assert len(inter) == manifest["num_interactions"] == users["num_interactions"].sum()
    assert (users["is_cold"] == (users["num_interactions"] <= cfg.data.cold_user_max_interactions)).all()
    assert 0.05 < users["is_cold"].mean() < 0.2  # about 10% cold users planted
    assert (inter["is_cold"] == users.loc[inter["user_id"], "is_cold"].to_numpy()).all()
    for _, g in inter.groupby("user_id"):
        g = g.sort_values(["timestamp", "item_id"])
        assert g["timestamp"].is_monotonic_increasing and g["timestamp"].is_unique
        assert g["split"].tolist()[-2:] == ["valid", "test"]  # test_per_user=1, every user has >= 4
        assert set(g["split"].tolist()[:-2]) == {"train"}
    prompts = _read(root, "prompts/train")
    cold = dict(zip(users.index, users["is_cold"]))
    assert [cold[u] for u in prompts.column("user_id").to_pylist()] == prompts.column("is_cold").to_pylist()


def test_synthetic_prompts_no_leakage_and_placeholders(synthetic_set):
    _, root, _, _ = synthetic_set
    inter = _read(root, "interactions")
    ts = {(u, i): t for u, i, t in zip(*(inter.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp")))}
    for split in schema.SPLITS:
        for r in _read(root, f"prompts/{split}").to_pylist():
            assert r["prompt_hybrid"].count(schema.PLACEHOLDER) == schema.expected_placeholders(len(r["target_item_ids"]))
            assert schema.PLACEHOLDER not in r["prompt_text"]
            pos = r["target_item_ids"][int(r["label"])] if r["task"] == "topk" else r["target_item_ids"][0]
            if (r["user_id"], pos) in ts:  # sampled CTR negatives have no timestamp of their own
                assert all(ts[(r["user_id"], h)] < ts[(r["user_id"], pos)] for h in r["history_item_ids"])
            if r["task"] in ("rating", "explanation") or (r["task"] == "ctr" and r["label"] == 1):
                assert (r["user_id"], pos) in ts


def test_synthetic_planted_structure_visible(synthetic_set):
    _, root, _, _ = synthetic_set
    items = _read(root, "items").to_pandas()
    genre = items["title"].str.split().str[1].to_numpy()  # "<word> <genre> <n>"
    inter = _read(root, "interactions").to_pandas()
    inter["genre"] = genre[inter["item_id"].to_numpy()]
    favourite = inter.groupby("user_id")["genre"].agg(lambda s: s.value_counts().idxmax())
    in_genre = inter["genre"].to_numpy() == favourite.loc[inter["user_id"]].to_numpy()
    assert in_genre.mean() > 0.5  # users concentrate on one genre
    assert inter["rating"][in_genre].mean() - inter["rating"][~in_genre].mean() > 1.0
    expl = _read(root, "prompts/train").filter(pc.equal(pc.field("task"), "explanation")).to_pylist()
    assert all(genre[r["target_item_ids"][0]] in r["answer"] for r in expl[:200])
    assert set(genre) <= {genre_name(c) for c in range(8)}


def test_rerun_is_noop_force_rebuilds_deterministically(synthetic_set, tmp_path):
    cfg, root, manifest, _ = synthetic_set
    lines: list[str] = []
    assert prepare(cfg, progress=lines.append) == manifest
    assert len(lines) == 1 and "already prepared" in lines[0]
    lines.clear()
    prepare(load_config([f"data.path={root}", "data.seed=5"]), progress=lines.append)
    assert "['seed']" in lines[-1]  # config drift is reported, the set is left alone
    other = str(tmp_path / "again")
    again = prepare(cfg, out_path=other, force=True, progress=_silent)
    assert again["prompts"] == manifest["prompts"]
    for sub in ["interactions"] + [f"prompts/{s}" for s in schema.SPLITS]:
        assert _read(other, sub).equals(_read(root, sub))
    # a partial set (no manifest) is rebuilt; a forced rebuild leaves no stale shards
    (tmp_path / "again" / schema.MANIFEST).unlink()
    (tmp_path / "again" / "prompts" / "train" / "part-09999.parquet").write_bytes(b"stale")
    assert not is_prepared(other)
    prepare(cfg, out_path=other, progress=_silent)
    assert is_prepared(other) and not (tmp_path / "again" / "prompts" / "train" / "part-09999.parquet").exists()


def test_cli_main(tmp_path, capsys):
    root = tmp_path / "cli"
    args = [f"data.path={root}", "data.num_users=40", "data.num_items=60", "data.tasks=[ctr,topk]"]
    assert main(args) == 0
    assert "[prepare] done" in capsys.readouterr().out
    manifest = json.loads((root / schema.MANIFEST).read_text())
    assert manifest["tasks"] == ["ctr", "topk"] and set(manifest["prompts"]["train"]) == {"ctr", "topk"}
    assert main(args) == 0 and "already prepared" in capsys.readouterr().out
    assert main(args + ["--force"]) == 0 and "[prepare] done" in capsys.readouterr().out
    assert main(["data.num_itemz=3"]) == 2 and "data.num_itemz" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- MovieLens-100K


def _ml_cfg(raw_path, out, *extra):
    return load_config([f"data.path={out}", "data.source=movielens-100k", f"data.raw_path={raw_path}", *extra])


@pytest.fixture(scope="module")
def ml_set(tmp_path_factory):
    raw = shared_dataset("ml-100k")
    out = str(tmp_path_factory.mktemp("ml") / "data")
    return out, prepare(_ml_cfg(raw, out), progress=_silent)


def test_movielens_100k_counts(ml_set):
    out, manifest = ml_set
    assert manifest["num_interactions"] == 100_000
    assert manifest["num_users"] == 943 and manifest["num_items"] == 1682
    assert manifest["bad_rows"]["total"] == 0
    assert manifest["interactions_per_split"] == {"train": 100_000 - 2 * 943, "valid": 943, "test": 943}
    assert "explanation" in manifest["skipped_tasks"] and "explanation" not in manifest["prompts"]["train"]
    users = _read(out, "users")
    assert users.column("raw_user_id").to_pylist()[:3] == ["1", "2", "3"]  # numeric id order
    items = _read(out, "items").to_pylist()
    assert items[0]["raw_item_id"] == "1" and items[0]["title"] == "Toy Story (1995)"
    test = _read(out, "prompts/test")
    assert test.schema.equals(schema.PROMPTS_SCHEMA)
    rating = test.filter(pc.equal(pc.field("task"), "rating"))
    assert rating.num_rows == 943
    inter = _read(out, "interactions")
    ts = {(u, i): t for u, i, t in zip(*(inter.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp")))}
    for r in rating.to_pylist():  # real data has same-second interactions: history is strictly earlier
        t_target = ts[(r["user_id"], r["target_item_ids"][0])]
        assert all(ts[(r["user_id"], h)] < t_target for h in r["history_item_ids"])
        assert r["prompt_hybrid"].count(schema.PLACEHOLDER) == 2


def test_movielens_bad_rows_counted_and_reported(tmp_path):
    src = shared_dataset("ml-100k")
    raw = tmp_path / "ml"
    raw.mkdir()
    (raw / "u.item").write_bytes((src / "u.item").read_bytes() + b"1683|Too Few Fields (1999)\n")
    bad_lines = ["1\t2\t3", "x\t2\t3\t881250949", "1\t2\t7\t881250949", "1\t2\t4\tyesterday", "1\t99999\t4\t881250949"]
    (raw / "u.data").write_bytes((src / "u.data").read_bytes() + ("\n".join(bad_lines) + "\n").encode())
    lines: list[str] = []
    manifest = prepare(_ml_cfg(raw, tmp_path / "out", "data.tasks=[rating]"), progress=lines.append)
    bad = manifest["bad_rows"]
    assert bad["total"] == 6 and manifest["num_interactions"] == 100_000 and manifest["num_items"] == 1682
    assert bad["by_reason"] == {"wrong field count": 2, "non-integer id": 1, "rating outside 1-5": 1,
                                "bad timestamp": 1, "unknown item id": 1}
    assert (bad["examples"][0]["file"].endswith("u.item") and bad["examples"][0]["line"] == 1683)
    assert [e["line"] for e in bad["examples"][1:]] == list(range(100_001, 100_006))
    assert all(e["file"].endswith("u.data") for e in bad["examples"][1:])
    assert any("u.data:100003" in line and "rating" in line for line in lines)


def test_movielens_missing_file_named(tmp_path):
    src = shared_dataset("ml-100k")
    (tmp_path / "ml").mkdir()
    shutil.copy(src / "u.data", tmp_path / "ml" / "u.data")
    with pytest.raises(FileNotFoundError, match="u.item"):
        prepare(_ml_cfg(tmp_path / "ml", tmp_path / "out"), progress=_silent)
    assert not is_prepared(str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------- S3 (moto)


def test_prepare_to_s3_and_read_back(s3_server, tmp_path):
    root = "s3://ckf-test/prepared/synthetic"
    cfg = load_config([f"data.path={root}", "data.num_users=50", "data.num_items=70"])
    manifest = prepare(cfg, progress=_silent)
    assert is_prepared(root)
    fs, base = get_filesystem(root)
    prompts = pads.dataset(f"{base}/prompts/train", format="parquet", filesystem=fs).to_table()
    assert prompts.schema.equals(schema.PROMPTS_SCHEMA)
    assert prompts.num_rows == manifest["prompt_rows_per_split"]["train"]
    local = prepare(cfg, out_path=str(tmp_path / "local"), progress=_silent)
    assert local["prompts"] == manifest["prompts"]
    assert prompts.equals(_read(str(tmp_path / "local"), "prompts/train"))
    with fs.open_input_stream(f"{base}/{schema.MANIFEST}") as f:
        assert json.loads(f.read())["num_users"] == 50
    assert np.isclose(sum(manifest["ctr_positive_fraction"].values()) / 3, 0.5, atol=0.1)
    lines: list[str] = []
    prepare(cfg, progress=lines.append)
    assert "already prepared" in lines[0]
