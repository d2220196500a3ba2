"""Live pickup of CF embedding versions (the training-loop side), in a real one-rank gloo process group."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ckf_dist.cf.store import publish_version
from ckf_dist.cf_pickup import CFVersionFollower
from ckf_dist.config import load_config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    # a free port, not a fixed one: other test runs on this machine use gloo groups at the same time
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Model:
    """Stands in for CKFModel's table side (the swap goes through the same ``set_cf_tables`` method)."""

    def __init__(self):
        self.user_table = torch.zeros(1, 4)
        self.swaps = []

    def set_cf_tables(self, users, items):
        self.user_table = users
        self.swaps.append((tuple(users.shape), tuple(items.shape)))


def _publish(root, n_users, n_items, dim=4, seed=0, data_manifest=None):
    """A version; bound to ``data_manifest`` (raw ids "u<k>" / "i<k>") when one is given, else unbound."""
    rng = np.random.default_rng(seed)
    bound = {}
    if data_manifest is not None:
        from ckf_dist.cf.binding import make_binding

        u_raw = np.array([f"u{k}" for k in range(n_users)])
        i_raw = np.array([f"i{k}" for k in range(n_items)])
        bound = dict(user_raw_ids=u_raw, item_raw_ids=i_raw,
                     binding=make_binding("data", data_manifest, u_raw, i_raw, id_maps_source="test"))
    return publish_version(root, rng.normal(size=(n_users, dim)).astype(np.float32),
                           rng.normal(size=(n_items, dim)).astype(np.float32), user_ids=np.arange(n_users),
                           item_ids=np.arange(n_items), model_type="mf", metrics={}, data_snapshot={}, keep=5,
                           progress=lambda m: None, **bound)


def test_follower_swaps_new_versions_and_rejects_corrupt_ones(tmp_path):
    root = str(tmp_path / "cf")
    cfg = load_config([f"cf.embeddings_path={root}", "cf.dim=4", "cf.refresh_check_every_steps=5"])
    v1 = _publish(root, 10, 6)
    lines = []
    follower = CFVersionFollower(cfg, v1, lines.append)
    model = _Model()
    assert follower.maybe_swap(5, model) is None  # nothing newer
    v2 = _publish(root, 12, 8, seed=1)  # new users and items arrived
    assert follower.maybe_swap(7, model) is None  # not a check step
    assert follower.maybe_swap(10, model) == v2
    assert model.swaps == [((13, 4), (9, 4))]  # +1 fallback row each
    assert any("swapped embeddings" in line and v2 in line for line in lines)

    v3 = _publish(root, 12, 8, seed=2)
    table = os.path.join(root, "versions", v3, "user_table.npy")
    raw = bytearray(open(table, "rb").read())
    raw[-1] ^= 0xFF
    open(table, "wb").write(bytes(raw))
    assert follower.maybe_swap(15, model) is None  # rejected: training stays on v2
    assert follower.current == v2 and len(model.swaps) == 1
    assert any("rejected" in line and v3 in line and "checksum" in line for line in lines)
    assert follower.maybe_swap(20, model) is None  # a rejected version is not retried every check
    assert sum("rejected" in line for line in lines) == 1


def test_follower_rejects_wrong_dimension(tmp_path):
    root = str(tmp_path / "cf")
    cfg = load_config([f"cf.embeddings_path={root}", "cf.dim=4", "cf.refresh_check_every_steps=1"])
    v1 = _publish(root, 5, 5)
    follower = CFVersionFollower(cfg, v1, lambda m: None)
    _publish(root, 5, 5, dim=6)
    assert follower.maybe_swap(1, _Model()) is None and follower.current == v1


def test_follower_rejects_versions_of_another_data_set(tmp_path):
    """Re-prepared data (other manifest) or an unbound version: rejected like a corrupt one, on every rank."""
    root = str(tmp_path / "cf")
    cfg = load_config([f"cf.embeddings_path={root}", "cf.dim=4", "cf.refresh_check_every_steps=1"])
    ours = {"format_version": 1, "created_at": "2026-11-27T10:00:00+00:00", "num_users": 10, "num_items": 6,
            "data_config": {"test_per_user": 1, "seed": 0}}
    theirs = dict(ours, created_at="2026-11-27T11:00:00+00:00", data_config={"test_per_user": 3, "seed": 0})
    v1 = _publish(root, 10, 6, data_manifest=ours)
    lines = []
    follower = CFVersionFollower(cfg, v1, lines.append, data_manifest=ours)
    model = _Model()
    v2 = _publish(root, 10, 6, seed=1, data_manifest=theirs)
    assert follower.maybe_swap(1, model) is None and follower.current == v1 and model.swaps == []
    assert any("rejected" in x and v2 in x and "another data set" in x and "test_per_user: 3 -> 1" in x
               for x in lines), lines
    v3 = _publish(root, 10, 6, seed=2)  # no binding (an old-format version)
    assert follower.maybe_swap(2, model) is None and follower.current == v1
    assert any("rejected" in x and v3 in x and "no data-set binding" in x for x in lines), lines
    v4 = _publish(root, 10, 6, seed=3, data_manifest=ours)
    assert follower.maybe_swap(3, model) == v4 and model.swaps == [((11, 4), (7, 4))]
    # without a data manifest (the call before the lead wires it) the follower behaves as before
    plain = CFVersionFollower(cfg, v1, lambda m: None)
    assert plain.data_manifest is None
