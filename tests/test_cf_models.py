"""CF models learn: planted-cluster synthetic data (metrics far above random) and MovieLens-100K."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from ckf_dist.cf import metrics as M
from ckf_dist.cf.lightgcn import normalized_adjacency
from ckf_dist.cf.reader import read_interactions
from ckf_dist.cf.testdata import planted_table, write_movielens_100k, write_planted, write_table
from ckf_dist.cf.trainer import evaluate_tables, train_cf
from ckf_dist.config import CFConfig

from tests.conftest import shared_dataset

QUIET = lambda _m: None  # noqa: E731


def test_recall_ndcg_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    rel = torch.tensor([[False, True, False, True], [True, False, False, False]])
    recall, ndcg = M.recall_ndcg_at_k(scores, rel, k=2)
    assert recall.tolist() == pytest.approx([0.5, 0.0])
    # user 0: hit at rank 2 -> DCG 1/log2(3); ideal (2 relevant) 1 + 1/log2(3)
    assert ndcg[0].item() == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)), rel=1e-5)
    assert M.auc(np.array([2.0, 3.0]), np.array([1.0, 2.5])) == pytest.approx(0.75)
    assert M.rmse(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)


def test_normalized_adjacency_is_symmetric_and_normalised():
    adj = normalized_adjacency(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 2]), 2, 3).to_dense()
    assert adj.shape == (5, 5)
    assert torch.allclose(adj, adj.T)
    # edge (user 0, item 0): deg(user0)=2, deg(item0)=1 -> 1/sqrt(2); duplicates collapse
    assert adj[0, 2].item() == pytest.approx(2 ** -0.5)
    assert adj[1, 3].item() == pytest.approx(1 / (2 ** 0.5 * 2 ** 0.5))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("planted"))
    write_planted(root, num_users=300, num_items=200, per_user=30, seed=1, rows_per_file=2000)
    return read_interactions(root, engine="arrow", progress=QUIET)


@pytest.mark.parametrize("model,loss", [("mf", "bpr"), ("mf", "pointwise"), ("lightgcn", "bpr"),
                                        ("lightgcn", "pointwise")])
def test_learns_planted_structure(planted, model, loss):
    cfg = CFConfig(model=model, loss=loss, dim=8, epochs=40, batch_size=512, lr=0.01)
    res = train_cf(planted, cfg, progress=QUIET)
    test = evaluate_tables(res.user_table, res.item_table, planted, "test")
    # random: AUC 0.5, Recall@20 ~ 20/200 = 0.1
    assert res.metrics["auc"] > 0.8 and test["auc"] > 0.8, (res.metrics, test)
    assert test["recall@20"] > 0.35, test
    assert res.user_table.shape == (300, 8) and res.item_table.shape == (200, 8)
    assert res.user_table.dtype == np.float32
    assert res.metrics["epochs_run"] <= 40 and 1 <= res.metrics["best_epoch"] <= res.metrics["epochs_run"]


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_the_returned_tables_are_the_best_epochs(planted, model):
    """Early stopping returns the best epoch's tables, not the last ones (MF's embeddings() are its parameters:
    a snapshot that shared their storage silently became the last epoch's tables)."""
    cfg = CFConfig(model=model, epochs=12, patience=3, lr=0.2, batch_size=512, dim=8)
    res = train_cf(planted, cfg, progress=QUIET)
    assert res.metrics["best_epoch"] < res.metrics["epochs_run"]  # the case under test: later epochs ran
    again = evaluate_tables(res.user_table, res.item_table, planted, "valid", max_users=cfg.eval_max_users,
                            seed=cfg.seed)
    assert again["auc"] == pytest.approx(res.metrics["auc"], abs=1e-12)
    assert again["recall@20"] == pytest.approx(res.metrics["recall@20"], abs=1e-12)


def test_rating_mf_beats_global_mean(tmp_path):
    write_planted(str(tmp_path), num_users=200, num_items=150, per_user=60, seed=2)
    data = read_interactions(str(tmp_path), engine="arrow", progress=QUIET)
    _, _, tr = data.select("train")
    _, _, vr = data.select("valid")
    baseline = M.rmse(np.full_like(vr, tr.mean()), vr)
    res = train_cf(data, CFConfig(model="mf", loss="mse", batch_size=256, epochs=30, patience=8, reg=0.01),
                   progress=QUIET)
    assert res.metrics["rmse"] < baseline - 0.1, (res.metrics["rmse"], baseline)


def test_reader_counts_malformed_rows(tmp_path):
    table = planted_table(num_users=50, num_items=40, per_user=10)
    bad = pa.Table.from_pydict({
        "user_id": pa.array([None, -3, 1], pa.int64()), "item_id": pa.array([1, 2, 3], pa.int64()),
        "rating": pa.array([None, None, None], pa.float32()), "timestamp": pa.array([1, 2, 3], pa.int64()),
        "split": pa.array(["train", "train", "oops"]), "is_cold": pa.array([False] * 3)}, schema=table.schema)
    write_table(str(tmp_path), pa.concat_tables([table, bad]))
    messages = []
    data = read_interactions(str(tmp_path), engine="arrow", progress=messages.append)
    assert data.stats["malformed"] == {"null_id": 1, "negative_id": 1, "unknown_split": 1}
    assert data.stats["rows_used"] == table.num_rows
    assert any("excluded 3" in m for m in messages)


def test_reader_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="interactions"):
        read_interactions(str(tmp_path / "nope"), engine="arrow")


def test_warm_start_copies_overlapping_rows(planted):
    """Rows follow raw ids (an interactions-only folder's raw ids are its data-set ids, as strings)."""
    from ckf_dist.cf.store import EmbeddingVersion

    prev = EmbeddingVersion("v0", np.full((3, 8), 0.5, np.float32), np.full((2, 8), -0.5, np.float32),
                            np.array([0, 1, 999]), np.array([4, 5]), {"model_type": "mf"},
                            np.array(["0", "1", "999"]), np.array(["4", "5"]))
    cfg = CFConfig(model="mf", dim=8, epochs=1, lr=1e-9)
    res = train_cf(planted, cfg, previous=prev, progress=QUIET)
    assert res.warm_start == {"from_version": "v0", "users": 2, "items": 2, "users_not_in_data": 1,
                              "items_not_in_data": 0}
    assert np.allclose(res.user_table[[0, 1]], 0.5, atol=1e-4) and np.allclose(res.item_table[[4, 5]], -0.5, atol=1e-4)


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    raw = shared_dataset("ml-100k")
    root = str(tmp_path_factory.mktemp("ml100k"))
    write_movielens_100k(root, str(raw))
    return read_interactions(root, engine="arrow", progress=QUIET)


@pytest.fixture(scope="module")
def popularity(movielens):
    """The popularity baseline on ML-100K test, through the same evaluator: score(u, i) = train count of i
    (1-d tables: users all 1, items their count). Measured 2026-11-27: AUC 0.799, Recall@20 0.116."""
    _, items, _ = movielens.select("train")
    counts = np.bincount(items, minlength=movielens.num_items).astype(np.float32)
    return evaluate_tables(np.ones((movielens.num_users, 1), np.float32), counts[:, None], movielens, "test")


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_movielens_100k(movielens, popularity, model, capsys):
    cfg = CFConfig(model=model, loss="bpr", dim=32, epochs=30 if model == "mf" else 20, batch_size=4096, lr=0.01,
                   patience=4)
    res = train_cf(movielens, cfg, progress=QUIET)
    test = evaluate_tables(res.user_table, res.item_table, movielens, "test")
    with capsys.disabled():
        print(f"\nML-100K {model}-BPR d=32: valid {res.metrics['auc']:.4f}/{res.metrics['recall@20']:.4f}, "
              f"test AUC {test['auc']:.4f} Recall@20 {test['recall@20']:.4f} NDCG@20 {test['ndcg@20']:.4f} "
              f"({res.metrics['epochs_run']} epochs, {res.metrics['train_seconds']:.1f}s)")
    # The CF model must beat popularity by a clear margin, not just clear a fixed bar. Measured 2026-11-27
    # (seeds 0-2, before train_cf returned the best epoch's MF tables instead of the last epoch's): MF AUC
    # 0.865-0.870 / Recall@20 0.160-0.174, LightGCN 0.865 / 0.149-0.153, popularity 0.799 / 0.116; after that fix
    # MF seed 0 gives 0.870 / 0.167. Margins >= 0.066 AUC and >= 0.033 Recall@20; asserted 0.04 and 0.015.
    assert test["auc"] > popularity["auc"] + 0.04, (test, popularity)
    assert test["recall@20"] > popularity["recall@20"] + 0.015, (test, popularity)


def test_movielens_100k_rating_rmse(movielens):
    res = train_cf(movielens, CFConfig(model="mf", loss="mse", dim=16, epochs=20, batch_size=1024, reg=0.05,
                                       patience=3), progress=QUIET)
    _, _, tr = movielens.select("train")
    _, _, vr = movielens.select("valid")
    assert res.metrics["rmse"] < M.rmse(np.full_like(vr, tr.mean()), vr) - 0.03
