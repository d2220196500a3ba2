"""CF pickup (``ckf_dist.cf_pickup``) beyond the happy path: when it checks, what it logs, that every rank loads the
version rank 0 broadcast (not whatever is latest by then), and a real 2-rank gloo group where one rank fails to
load: both stay on the current version."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ckf_dist.cf import store
from ckf_dist.cf.store import publish_version
from ckf_dist.cf_pickup import CFVersionFollower
from ckf_dist.config import load_config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank():
    """A one-rank gloo group for this test only (the 2-rank test forks, so no group may be left open)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Model:
    def __init__(self):
        self.user_table = torch.zeros(1, 4)
        self.swaps = []

    def set_cf_tables(self, users, items):
        self.user_table = users
        self.swaps.append((users.clone(), items.clone()))


def _publish(root, n_users, n_items, value, dim=4):
    return publish_version(root, np.full((n_users, dim), value, np.float32), np.full((n_items, dim), value, np.float32),
                           user_ids=np.arange(n_users), item_ids=np.arange(n_items), model_type="mf", metrics={},
                           data_snapshot={}, keep=5, progress=lambda m: None)


def _cfg(root, every):
    return load_config([f"cf.embeddings_path={root}", "cf.dim=4", f"cf.refresh_check_every_steps={every}"])


def test_checks_only_on_check_steps_never_at_step_0_nor_when_disabled(tmp_path, one_rank):
    root = str(tmp_path / "cf")
    v1 = _publish(root, 5, 4, 1.0)
    v2 = _publish(root, 5, 4, 2.0)
    off = CFVersionFollower(_cfg(root, 0), v1, lambda m: None)
    assert [off.maybe_swap(s, _Model()) for s in (0, 1, 2, 10)] == [None] * 4
    every2 = CFVersionFollower(_cfg(root, 2), v1, lambda m: None)
    model = _Model()
    assert every2.maybe_swap(0, model) is None and every2.maybe_swap(3, model) is None and model.swaps == []
    assert every2.maybe_swap(4, model) == v2 and len(model.swaps) == 1


def test_swap_loads_the_broadcast_version_and_logs_it(tmp_path, one_rank, monkeypatch):
    """Rank 0 read the pointer (v2); v3 was published before the ranks loaded: they load v2, whole."""
    root = str(tmp_path / "cf")
    v1 = _publish(root, 5, 4, 1.0)
    v2 = _publish(root, 12, 8, 2.0)
    _publish(root, 7, 3, 3.0)
    monkeypatch.setattr(store, "latest_version", lambda r, s3=None: v2)
    lines = []
    follower = CFVersionFollower(_cfg(root, 5), v1, lines.append)
    model = _Model()
    assert follower.maybe_swap(10, model) == v2 and follower.current == v2
    (users, items), = model.swaps
    assert users.shape == (13, 4) and items.shape == (9, 4)  # v2's 12 users, 8 items + fallback rows
    assert torch.all(users == 2.0) and torch.all(items == 2.0)
    m = re.fullmatch(rf"CF pickup: step 10: swapped embeddings {v1} -> {v2} \(12 users, 8 items\) in (\d+\.\d\d)s",
                     lines[-1])
    assert m and float(m.group(1)) < 600, lines  # a duration, not a clock reading


def test_unreadable_pointer_is_logged_and_training_goes_on(tmp_path, one_rank):
    root = str(tmp_path / "cf")
    v1 = _publish(root, 5, 4, 1.0)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("{not json")
    lines = []
    follower = CFVersionFollower(_cfg(root, 1), v1, lines.append)
    assert follower.maybe_swap(1, _Model()) is None and follower.current == v1
    assert len(lines) == 1 and lines[0].startswith(f"CF pickup: cannot read the latest pointer under {root}: ")
    assert "unreadable" in lines[0]


def test_wrong_dimension_is_rejected_with_the_reason(tmp_path, one_rank):
    root = str(tmp_path / "cf")
    v1 = _publish(root, 5, 4, 1.0)
    v2 = _publish(root, 5, 4, 2.0, dim=6)
    lines = []
    follower = CFVersionFollower(_cfg(root, 1), v1, lines.append)
    assert follower.maybe_swap(1, _Model()) is None
    assert lines == [f"CF pickup: rejected embedding version {v2} at step 1; staying on {v1} "
                     "(dimension 6 != cf.dim 4)"]


def _rank_main(rank: int, port: int, root: str, v1: str, fail_rank, queue) -> None:
    """One rank of the 2-rank test (a forked child); reports (rank, result, current, log lines, swaps)."""
    result, code = (rank, "error", "did not finish", [], 0), 1
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        if rank == fail_rank:
            def broken(*args, **kwargs):
                raise OSError("disk on fire")

            store.load_version = broken  # this rank cannot read the new version
        lines = []
        follower = CFVersionFollower(_cfg(root, 2), v1, lines.append)
        model = _Model()
        got = follower.maybe_swap(2, model)
        result, code = (rank, got, follower.current, lines, len(model.swaps)), 0
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result = (rank, "error", repr(exc), [], 0)
    finally:
        queue.put(result)
        queue.close()
        queue.join_thread()  # flush before leaving without the parent's (pytest's) exit handlers
        os._exit(code)


@pytest.mark.parametrize("fail_rank", [None, 1, 0])
def test_two_ranks_agree_to_swap_or_both_stay(tmp_path, fail_rank):
    root = str(tmp_path / "cf")
    v1 = _publish(root, 5, 4, 1.0)
    v2 = _publish(root, 6, 5, 2.0)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, root, v1, fail_rank, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    # (a call in this process as well: mutation testing records which tests reach maybe_swap in the test process
    # only, not in the forked ranks; step 0 returns before any collective)
    assert CFVersionFollower(_cfg(root, 2), v1, lambda m: None).maybe_swap(0, _Model()) is None
    results = sorted(queue.get(timeout=120) for _ in procs)  # hang guards only
    for p in procs:
        p.join(120)
    assert [r[1] for r in results if r[1] == "error"] == [], results
    if fail_rank is None:
        assert [(r[1], r[2], r[4]) for r in results] == [(v2, v2, 1), (v2, v2, 1)]
        return
    assert [(r[1], r[2], r[4]) for r in results] == [(None, v1, 0), (None, v1, 0)]  # neither rank swapped
    for rank, _, _, lines, _ in results:
        why = "disk on fire" if rank == fail_rank else "failed to load on another rank"
        assert lines == [f"CF pickup: rejected embedding version {v2} at step 2; staying on {v1} ({why})"], lines


def test_version_of_another_data_set_is_rejected_naming_store_and_data(tmp_path, one_rank):
    from ckf_dist.cf.binding import make_binding

    root, data = str(tmp_path / "cf"), str(tmp_path / "data")
    ours = {"format_version": 1, "created_at": "2026-11-27T10:00:00+00:00", "num_users": 5, "num_items": 4,
            "data_config": {"test_per_user": 1, "seed": 0}}
    theirs = dict(ours, data_config={"test_per_user": 2, "seed": 0})
    u_raw, i_raw = np.array([f"u{k}" for k in range(5)]), np.array([f"i{k}" for k in range(4)])

    def bound(manifest, value):
        return publish_version(root, np.full((5, 4), value, np.float32), np.full((4, 4), value, np.float32),
                               user_ids=np.arange(5), item_ids=np.arange(4), model_type="mf", metrics={},
                               data_snapshot={}, keep=5, progress=lambda m: None, user_raw_ids=u_raw,
                               item_raw_ids=i_raw, binding=make_binding("data", manifest, u_raw, i_raw,
                                                                        id_maps_source="test"))

    v1 = bound(ours, 1.0)
    v2 = bound(theirs, 2.0)
    cfg = load_config([f"cf.embeddings_path={root}", f"data.path={data}", "cf.dim=4", "cf.refresh_check_every_steps=1"])
    lines = []
    follower = CFVersionFollower(cfg, v1, lines.append, data_manifest=ours)
    assert follower.maybe_swap(1, _Model()) is None
    assert len(lines) == 1 and lines[0].startswith(
        f"CF pickup: rejected embedding version {v2} at step 1; staying on {v1} (CF embedding version {v2} under "
        f"{root} cannot be used with the data set at {data}: "), lines


def test_table_checksum():
    """sha256 (first 16 hex digits) of the float32 values, whatever the table's dtype and memory layout."""
    import hashlib

    from ckf_dist.cf_pickup import table_checksum

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = hashlib.sha256(values.tobytes()).hexdigest()[:16]
    assert table_checksum(torch.from_numpy(values)) == want
    assert table_checksum(torch.from_numpy(values).double()) == want
    assert table_checksum(torch.from_numpy(values.T.copy()).t()) == want  # a non-contiguous view
    assert table_checksum(torch.from_numpy(values) + 1) != want and len(want) == 16
