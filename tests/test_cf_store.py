"""Embedding store: round trip, fallback rows, atomic publication, crash safety, corruption, concurrency, S3."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

from ckf_dist.cf import store
from ckf_dist.cf.store import CorruptVersionError, latest_version, list_versions, load_version, publish_version


def _publish(root, value=1.0, n_users=5, n_items=4, d=3, keep=5, s3=None, **kw):
    ut = np.full((n_users, d), value, np.float32)
    it = np.full((n_items, d), value, np.float32)
    return publish_version(root, ut, it, user_ids=np.arange(n_users), item_ids=np.arange(n_items), model_type="mf",
                           metrics={"auc": 0.9, "nan": float("nan")}, data_snapshot={"num_users": n_users + 2,
                                                                                    "num_items": n_items},
                           keep=keep, s3=s3, **kw)


def test_round_trip_and_manifest(tmp_path):
    root = str(tmp_path / "cf")
    assert latest_version(root) is None and list_versions(root) == []
    with pytest.raises(FileNotFoundError, match="no published embedding version"):
        load_version(root)
    ut = np.arange(12, dtype=np.float32).reshape(4, 3)
    it = np.arange(6, dtype=np.float32).reshape(2, 3)
    v = publish_version(root, ut, it, user_ids=np.array([0, 2, 3, 9]), item_ids=np.array([1, 0]), model_type="lightgcn",
                        metrics={"auc": 0.8}, data_snapshot={"path": "x", "num_users": 6, "num_items": 3})
    assert v.startswith("v") and latest_version(root) == v and list_versions(root) == [v]
    ev = load_version(root)
    assert ev.version == v and ev.dim == 3
    np.testing.assert_array_equal(ev.user_table, ut)
    m = ev.manifest
    assert m["model_type"] == "lightgcn" and m["num_user_rows"] == 4 and m["num_item_rows"] == 2
    assert m["metrics"] == {"auc": 0.8} and m["data_snapshot"]["path"] == "x"
    assert set(m["files"]) == set(store.FILES.values()) and all(len(f["sha256"]) == 64 for f in m["files"].values())
    # dense layout: rows by id, last row = fallback = mean of trained rows; id 9 >= U=6 is not placed
    du, di = ev.dense_tables()
    assert du.shape == (7, 3) and di.shape == (4, 3)
    fallback = ut.mean(0)
    np.testing.assert_allclose(du[0], ut[0]); np.testing.assert_allclose(du[2], ut[1])
    np.testing.assert_allclose(du[1], fallback); np.testing.assert_allclose(du[4], fallback)
    np.testing.assert_allclose(du[6], fallback)
    np.testing.assert_allclose(di[0], it[1]); np.testing.assert_allclose(di[2], it.mean(0))
    du, _ = ev.dense_tables(num_users=12)
    assert du.shape == (13, 3)
    np.testing.assert_allclose(du[9], ut[3]); np.testing.assert_allclose(du[12], fallback)


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="user_ids"):
        publish_version(str(tmp_path), np.zeros((3, 2)), np.zeros((2, 2)), user_ids=np.arange(2),
                        item_ids=np.arange(2), model_type="mf", metrics={}, data_snapshot={})
    with pytest.raises(ValueError, match="non-finite"):
        publish_version(str(tmp_path), np.full((2, 2), np.nan), np.zeros((2, 2)), user_ids=np.arange(2),
                        item_ids=np.arange(2), model_type="mf", metrics={}, data_snapshot={})


def test_keeps_configured_number_of_versions(tmp_path):
    root = str(tmp_path)
    made = [_publish(root, value=k, keep=3) for k in range(6)]
    assert made == sorted(made)  # ids sort by creation time
    assert list_versions(root) == made[-3:] and latest_version(root) == made[-1]
    with pytest.raises(FileNotFoundError, match=made[0]):
        load_version(root, made[0])


def test_resume_restores_the_pinned_version(tmp_path):
    root = str(tmp_path)
    v1 = _publish(root, value=1.0)
    pinned = load_version(root).version  # what a trainer records in its checkpoint
    _publish(root, value=2.0)
    again = load_version(root, pinned)  # after a restart: the same tables, not the newer ones
    assert again.version == v1 and float(again.user_table[0, 0]) == 1.0
    assert float(load_version(root).user_table[0, 0]) == 2.0


class Pause:
    """Stops one thread at a chosen store call until the test releases it, to force an interleaving without
    sleeps: the first call of ``store.<func>`` from the thread named ``thread`` on a path ending with ``suffix``
    sets ``reached`` and waits for ``go`` (the 60 s waits only bound a hang; no outcome depends on time)."""

    def __init__(self, monkeypatch, func: str, suffix: str, thread: str):
        self.reached, self.go = threading.Event(), threading.Event()
        real = getattr(store, func)

        def paused(fs, path, *args):
            if threading.current_thread().name == thread and path.endswith(suffix) and not self.reached.is_set():
                self.reached.set()
                assert self.go.wait(60), "the test never released the paused thread"
            return real(fs, path, *args)

        monkeypatch.setattr(store, func, paused)

    def wait_reached(self):
        assert self.reached.wait(60), "the thread never reached the pause point"


def _in_thread(name, fn):
    """Runs fn in a thread named ``name``; returns (thread, box) with box["value"] or box["error"] once joined."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc

    t = threading.Thread(target=run, name=name)
    t.start()
    return t, box


def _values(ev):
    """The single value of each table of a version published by ``_publish`` (uniform tables)."""
    u, i = np.unique(ev.user_table), np.unique(ev.item_table)
    assert len(u) == 1 and len(i) == 1, f"{ev.version}: tables are not uniform: {u} {i}"
    return float(u[0]), float(i[0])


# (where the reader stops, publishes while it waits, keep, the value it must return):
READER_CASES = {
    # pointer read (v1), v2 published; v1 is still kept -> the reader finishes on v1, whole
    "pointer_read_then_publish": ("manifest.json", 1, 2, 1.0),
    # pointer read (v1), v2 and v3 published with keep=1 -> v1 is gone; the reader re-reads the pointer -> v3
    "version_deleted_before_manifest": ("manifest.json", 2, 1, 3.0),
    # user table of v1 read, then v1 deleted (v2 published, keep=1) -> never v1's users with v2's items: v2 whole
    "version_deleted_between_tables": ("item_table.npy", 1, 1, 2.0),
}


@pytest.mark.parametrize("case", list(READER_CASES))
def test_reader_interrupted_by_publication_sees_old_or_new_never_a_mix(tmp_path, monkeypatch, case):
    suffix, publishes, keep, expect = READER_CASES[case]
    root = str(tmp_path)
    _publish(root, value=1.0, n_users=40, n_items=30, d=4, keep=keep)
    pause = Pause(monkeypatch, "_read_bytes", suffix, thread="reader")
    thread, box = _in_thread("reader", lambda: load_version(root))
    pause.wait_reached()
    for k in range(publishes):
        _publish(root, value=2.0 + k, n_users=40, n_items=30, d=4, keep=keep)
    pause.go.set()
    thread.join(60)
    assert "error" not in box, box.get("error")
    assert _values(box["value"]) == (expect, expect)
    assert len(list_versions(root)) == min(keep, publishes + 1)


@pytest.mark.parametrize("stop_before", ["manifest.json", "latest"])
def test_publication_in_progress_is_invisible_until_the_pointer_moves(tmp_path, monkeypatch, stop_before):
    """A publisher stopped after writing the tables (before the manifest) or after the manifest (before the
    pointer): readers still get the previous version, whole; once the pointer moves they get the new one."""
    root = str(tmp_path)
    v1 = _publish(root, value=1.0)
    pause = Pause(monkeypatch, "_write_atomic", stop_before, thread="publisher")
    thread, box = _in_thread("publisher", lambda: _publish(root, value=2.0))
    pause.wait_reached()
    assert latest_version(root) == v1
    assert _values(load_version(root)) == (1.0, 1.0)
    pending = [v for v in os.listdir(os.path.join(root, "versions")) if v != v1]
    assert len(pending) == 1  # its folder exists, tables written
    if stop_before == "manifest.json":
        assert list_versions(root) == [v1]  # no manifest yet: not a version
        with pytest.raises(CorruptVersionError, match="incomplete"):
            load_version(root, pending[0])
    else:
        assert list_versions(root) == sorted([v1, pending[0]])  # complete, but not latest yet
        assert _values(load_version(root, pending[0])) == (2.0, 2.0)
    pause.go.set()
    thread.join(60)
    assert "error" not in box, box.get("error")
    assert box["value"] == pending[0] == latest_version(root)
    assert _values(load_version(root)) == (2.0, 2.0)


def test_crashed_publish_leaves_latest_alone(tmp_path, monkeypatch):
    root = str(tmp_path)
    v1 = _publish(root, value=1.0)
    real = store._write_atomic

    def crash(fs, path, data):
        if path.endswith(store.MANIFEST_FILE):
            raise RuntimeError("simulated crash")
        return real(fs, path, data)

    monkeypatch.setattr(store, "_write_atomic", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _publish(root, value=2.0)
    monkeypatch.undo()
    assert latest_version(root) == v1 and list_versions(root) == [v1]
    partial = [d for d in os.listdir(tmp_path / "versions") if d != v1]
    assert len(partial) == 1
    with pytest.raises(CorruptVersionError, match=f"{partial[0]}.*incomplete"):
        load_version(root, partial[0])
    assert float(load_version(root).user_table[0, 0]) == 1.0


def _version_dir(root, v):
    return os.path.join(root, "versions", v)


def test_corrupt_versions_are_rejected(tmp_path):
    root = str(tmp_path)
    v = _publish(root)
    path = os.path.join(_version_dir(root, v), "item_table.npy")
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CorruptVersionError, match=f"{v}.*checksum mismatch for item_table.npy"):
        load_version(root)
    assert issubclass(CorruptVersionError, ValueError)

    v2 = _publish(root)
    os.remove(os.path.join(_version_dir(root, v2), "user_ids.npy"))
    with pytest.raises(CorruptVersionError, match=f"{v2}.*user_ids.npy is missing"):
        load_version(root, v2)

    v3 = _publish(root)
    mpath = os.path.join(_version_dir(root, v3), "manifest.json")
    manifest = json.load(open(mpath))
    manifest["dim"] = 7
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(CorruptVersionError, match=f"{v3}.*does not match the sha256"):
        load_version(root)  # via the pointer: the manifest itself changed
    with pytest.raises(CorruptVersionError, match=f"{v3}.*user_table.npy has shape .* expected"):
        load_version(root, v3)


def _publisher(root, n, q):
    try:
        for k in range(n):
            _publish(root, value=float(k), n_users=50, n_items=40, keep=4)
        q.put("ok")
    except Exception as exc:  # noqa: BLE001
        q.put(repr(exc))


def test_concurrent_publishers_do_not_corrupt_each_other(tmp_path):
    root = str(tmp_path)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(root, 6, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)  # a hang guard only
    assert [q.get(timeout=60) for _ in procs] == ["ok", "ok"]
    versions = list_versions(root)
    assert len(versions) == 4  # keep=4 out of 12 publishes
    for v in versions:
        load_version(root, v)  # every kept version verifies
    assert latest_version(root) == versions[-1]  # the pointer only moves forward


@pytest.mark.integration
def test_s3_round_trip_and_crash(s3_server, monkeypatch):
    root = "s3://ckf-test/store-test/cf"
    v1 = _publish(root, value=1.0, keep=2)
    assert latest_version(root) == v1 and list_versions(root) == [v1]
    assert float(load_version(root).item_table[0, 0]) == 1.0
    real = store._write_atomic

    def crash(fs, path, data):
        if path.endswith(store.MANIFEST_FILE):
            raise RuntimeError("simulated crash")
        return real(fs, path, data)

    monkeypatch.setattr(store, "_write_atomic", crash)
    with pytest.raises(RuntimeError):
        _publish(root, value=2.0, keep=2)
    monkeypatch.undo()
    assert latest_version(root) == v1 and list_versions(root) == [v1]
    v3 = _publish(root, value=3.0, keep=2)
    v4 = _publish(root, value=4.0, keep=2)
    assert list_versions(root) == [v3, v4] and latest_version(root) == v4
    assert float(load_version(root).user_table[0, 0]) == 4.0
    with pytest.raises(FileNotFoundError, match=v1):
        load_version(root, v1)
