"""Every CF embedding version is bound to the prepared data set it was trained on (manifest hash + raw-id maps):
re-preparing must not reuse an old version, warm starts map rows by raw id, evaluation refuses a mismatch."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ckf_dist.config import CFConfig, load_config

QUIET = lambda _m: None  # noqa: E731


def _cfg(root, *extra):
    return load_config([f"data.path={root}/data", "data.num_users=40", "data.num_items=50",
                        "data.interactions_per_user=12", "data.num_candidates=4", "cf.reader=arrow", "cf.epochs=2",
                        "cf.dim=8", *extra])


def _prepare(cfg, force=False):
    from ckf_dist.data.prepare import prepare
    from ckf_dist.data.streaming import read_manifest

    prepare(cfg, force=force, progress=QUIET)
    return read_manifest(cfg)


def _raw_ids(cfg, table, column):
    t = pq.read_table(f"{cfg.data.path}/{table}").sort_by(column.replace("raw_", ""))
    return np.asarray(t.column(column).to_pylist())


def test_reprepare_does_not_reuse_the_old_version(tmp_path):
    """test_per_user 1 -> 3 re-prepared in place: the old version saw interactions that are now held out."""
    from ckf_dist.cf.store import list_versions, load_version
    from ckf_dist.cf_refresh import ensure_embeddings

    cfg1 = _cfg(tmp_path)
    m1 = _prepare(cfg1)
    root = f"{tmp_path}/data/cf"
    lines = []
    v1 = ensure_embeddings(cfg1, m1, lines.append)
    assert any("no CF embedding version" in x for x in lines)
    assert ensure_embeddings(cfg1, m1, lines.append) == v1 and list_versions(root) == [v1]  # bound: reused
    ev1 = load_version(root, v1)
    # the binding's hash is that of _manifest.json itself (prepare writes it as io.write_json does)
    assert ev1.manifest["binding"]["data_manifest_sha256"] == ev1.manifest["data_snapshot"]["dataset_manifest_sha256"]
    np.testing.assert_array_equal(ev1.user_raw_ids, _raw_ids(cfg1, "users", "raw_user_id")[ev1.user_ids])
    np.testing.assert_array_equal(ev1.item_raw_ids, _raw_ids(cfg1, "items", "raw_item_id")[ev1.item_ids])

    cfg3 = _cfg(tmp_path, "data.test_per_user=3")
    m3 = _prepare(cfg3, force=True)
    lines.clear()
    v2 = ensure_embeddings(cfg3, m3, lines.append)
    assert v2 != v1 and list_versions(root) == [v1, v2]
    assert any(v1 in x and "another data set" in x and "refreshing" in x for x in lines), lines
    ev2 = load_version(root, v2)
    assert ev2.manifest["metrics"]["warm_start"].get("users") is None  # no warm start from the leaky v1
    assert ensure_embeddings(cfg3, m3, QUIET) == v2


def test_refresh_after_reprepare_does_not_warm_start_from_the_old_set(tmp_path):
    """Its rows encode interactions the new split holds out; the ids were reassigned too: cold start."""
    from ckf_dist.cf.store import load_version
    from ckf_dist.cf_refresh import refresh_once

    cfg1 = _cfg(tmp_path)
    _prepare(cfg1)
    v1 = refresh_once(cfg1, progress=QUIET)
    v1b = refresh_once(cfg1, progress=QUIET)  # same data set: warm start as before
    root = f"{tmp_path}/data/cf"
    assert load_version(root, v1b).manifest["metrics"]["warm_start"]["from_version"] == v1
    assert load_version(root, v1b).manifest["metrics"]["warm_start"]["users"] == 40
    cfg3 = _cfg(tmp_path, "data.test_per_user=3")
    _prepare(cfg3, force=True)
    lines = []
    v2 = refresh_once(cfg3, progress=lines.append)
    assert "users" not in load_version(root, v2).manifest["metrics"]["warm_start"]
    assert any(v1b in x and "another data set" in x and "cold start" in x for x in lines), lines


def test_load_for_data_refuses_other_and_unbound_versions(tmp_path):
    from ckf_dist.cf.binding import DataMismatchError, load_version_for_data
    from ckf_dist.cf.store import publish_version
    from ckf_dist.cf_refresh import refresh_once

    cfg1 = _cfg(tmp_path)
    m1 = _prepare(cfg1)
    root = f"{tmp_path}/data/cf"
    v1 = refresh_once(cfg1, progress=QUIET)
    assert load_version_for_data(root, v1, m1).version == v1
    assert load_version_for_data(root, None, m1).version == v1  # None = latest

    cfg2 = _cfg(tmp_path, "data.test_per_user=3")
    m2 = _prepare(cfg2, force=True)
    with pytest.raises(DataMismatchError) as err:
        load_version_for_data(root, v1, m2, data_path=cfg2.data.path)
    msg = str(err.value)
    assert v1 in msg and cfg2.data.path in msg and "test_per_user" in msg and "1 -> 3" in msg, msg
    assert isinstance(err.value, ValueError)

    # an old-format version (no binding, no raw ids) is refused, never silently used
    legacy = publish_version(root, np.zeros((3, 8), np.float32), np.zeros((2, 8), np.float32),
                             user_ids=np.arange(3), item_ids=np.arange(2), model_type="mf", metrics={},
                             data_snapshot={"num_users": 40, "num_items": 50}, progress=QUIET)
    with pytest.raises(DataMismatchError, match=f"{legacy}.*no data-set binding"):
        load_version_for_data(root, legacy, m2)


def test_binding_without_raw_ids_is_rejected_and_raw_ids_are_checksummed(tmp_path):
    import os

    from ckf_dist.cf.store import CorruptVersionError, load_version, publish_version

    root = str(tmp_path / "cf")
    kw = dict(user_ids=np.arange(3), item_ids=np.arange(2), model_type="mf", metrics={}, data_snapshot={},
              progress=QUIET)
    with pytest.raises(ValueError, match="raw ids"):
        publish_version(root, np.zeros((3, 2)), np.zeros((2, 2)), binding={"data_manifest_sha256": "x"}, **kw)
    with pytest.raises(ValueError, match="user_raw_ids"):
        publish_version(root, np.zeros((3, 2)), np.zeros((2, 2)), user_raw_ids=["a", "b"],
                        item_raw_ids=["x", "y"], binding={"data_manifest_sha256": "x"}, **kw)
    v = publish_version(root, np.zeros((3, 2)), np.zeros((2, 2)), user_raw_ids=["a", "b", "c"],
                        item_raw_ids=["x", "y"], binding={"data_manifest_sha256": "x"}, **kw)
    ev = load_version(root)
    assert list(ev.user_raw_ids) == ["a", "b", "c"] and ev.manifest["binding"]["data_manifest_sha256"] == "x"
    assert "user_raw_ids.npy" in ev.manifest["files"]
    path = os.path.join(root, "versions", v, "item_raw_ids.npy")
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0x01
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CorruptVersionError, match=f"{v}.*checksum mismatch for item_raw_ids.npy"):
        load_version(root, v)


def test_warm_start_maps_rows_by_raw_id(tmp_path):
    """The previous version's data-set ids are a permutation of this set's: rows must follow the raw ids."""
    from ckf_dist.cf.reader import read_interactions
    from ckf_dist.cf.store import EmbeddingVersion, load_version, publish_version
    from ckf_dist.cf.trainer import train_cf

    cfg = _cfg(tmp_path)
    _prepare(cfg)
    data = read_interactions(cfg.data.path, engine="arrow", progress=QUIET)
    raw_u, raw_i = _raw_ids(cfg, "users", "raw_user_id"), _raw_ids(cfg, "items", "raw_item_id")
    np.testing.assert_array_equal(data.user_raw_ids, raw_u)
    np.testing.assert_array_equal(data.item_raw_ids, raw_i)

    rng = np.random.default_rng(5)
    # previous data set: the same raw users in another id order, minus some, plus users unknown here
    old_u = rng.permutation(40)[:30]  # data-set ids in the previous set, rows 0..29
    prev_u_raw = np.concatenate([raw_u[rng.permutation(40)[:30]], ["ghost-1", "ghost-2"]])
    old_u = np.concatenate([old_u, [40, 41]])
    old_i = rng.permutation(50)[:20]
    prev_i_raw = raw_i[rng.permutation(50)[:20]]
    ut = rng.normal(size=(32, 8)).astype(np.float32)
    it = rng.normal(size=(20, 8)).astype(np.float32)
    root = str(tmp_path / "prev")
    publish_version(root, ut, it, user_ids=old_u, item_ids=old_i, user_raw_ids=prev_u_raw, item_raw_ids=prev_i_raw,
                    binding={"data_manifest_sha256": "another"}, model_type="mf", metrics={},
                    data_snapshot={}, progress=QUIET)
    prev = load_version(root)
    lines = []
    res = train_cf(data, CFConfig(model="mf", dim=8, epochs=1, lr=1e-9), previous=prev, progress=lines.append)
    cur_of_raw = {r: k for k, r in enumerate(raw_u)}
    for row, r in enumerate(prev_u_raw[:30]):
        np.testing.assert_allclose(res.user_table[cur_of_raw[r]], ut[row], atol=1e-4, err_msg=f"user {r}")
    cur_of_raw_i = {r: k for k, r in enumerate(raw_i)}
    for row, r in enumerate(prev_i_raw):
        np.testing.assert_allclose(res.item_table[cur_of_raw_i[r]], it[row], atol=1e-4, err_msg=f"item {r}")
    assert res.warm_start["users"] == 30 and res.warm_start["items"] == 20
    assert res.warm_start["users_not_in_data"] == 2 and res.warm_start["items_not_in_data"] == 0
    assert set(res.user_ids) >= {cur_of_raw[r] for r in prev_u_raw[:30]}

    # an unbound previous version (no raw ids): cold start, said in a progress line
    unbound = EmbeddingVersion("v-old", ut, it, old_u, old_i, {"model_type": "mf"})
    lines.clear()
    res = train_cf(data, CFConfig(model="mf", dim=8, epochs=1, lr=1e-9), previous=unbound, progress=lines.append)
    assert "users" not in res.warm_start and "raw ids" in res.warm_start["skipped"]
    assert any("v-old" in x and "cold start" in x for x in lines), lines


def test_cf_only_baseline_refuses_a_version_of_another_data_set(tmp_path):
    from ckf_dist import evaluate
    from ckf_dist.cf.binding import DataMismatchError
    from ckf_dist.cf_refresh import refresh_once

    cfg1 = _cfg(tmp_path)
    _prepare(cfg1)
    v1 = refresh_once(cfg1, progress=QUIET)
    version, users, items = evaluate.cf_baseline_tables(cfg1)
    assert version == v1 and users.shape == (41, 8) and items.shape == (51, 8)
    cfg2 = _cfg(tmp_path, "data.seed=7")
    _prepare(cfg2, force=True)
    with pytest.raises(DataMismatchError, match=f"{v1}.*another data set.*seed: 0 -> 7"):
        evaluate.cf_baseline_tables(cfg2)
