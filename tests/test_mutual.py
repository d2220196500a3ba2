"""Mutual learning (cf.mutual, ckf_dist.mutual): the ridge map, the regulariser, the export of the LLM side's item
representations, finding/reading them, and one refresh end to end."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from ckf_dist.config import ConfigError, load_config
from ckf_dist.mutual import (REPR_FILE, REPR_META, find_source, item_representations, load_item_representations,
                             mutual_loss, mutual_targets, ridge_map)


# ------------------------------------------------------------------------------------------ the map
@pytest.mark.parametrize("n,h", [(40, 6), (5, 12)])  # primal (h <= n) and dual (h > n) solves
def test_ridge_map_recovers_an_exact_linear_map(n, h):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(n, h, generator=g)
    w0, b0 = torch.randn(h, 3, generator=g), torch.randn(3, generator=g)
    e = r @ w0 + b0
    w, b = ridge_map(r, e, ridge=1e-9)
    assert torch.allclose(r @ w + b, e, atol=1e-4)  # fitted values exact (W itself is not unique when h > n)
    if h <= n:
        assert torch.allclose(w, w0, atol=1e-4) and torch.allclose(b, b0, atol=1e-4)


def test_ridge_map_primal_and_dual_agree_and_shrink():
    g = torch.Generator().manual_seed(1)
    r, e = torch.randn(10, 10, generator=g), torch.randn(10, 2, generator=g)
    # n == h takes the primal branch; the dual of the same problem (computed by hand) must give the same W
    w, b = ridge_map(r, e, ridge=0.5)
    rc, ec = (r - r.mean(0)).double(), (e - e.mean(0)).double()
    lam = 0.5 * float((rc * rc).sum()) / 10
    w_dual = rc.T @ torch.linalg.solve(rc @ rc.T + lam * torch.eye(10, dtype=torch.float64), ec)
    assert torch.allclose(w.double(), w_dual, atol=1e-5)
    # a huge ridge maps everything to the mean vector
    w_big, b_big = ridge_map(r, e, ridge=1e9)
    assert torch.allclose(r @ w_big + b_big, e.mean(0).expand(10, 2), atol=1e-5)
    # the ridge is relative: scaling R does not change the fitted values
    w_s, b_s = ridge_map(100 * r, e, ridge=0.5)
    assert torch.allclose(100 * r @ w_s + b_s, r @ w + b, atol=1e-4)


def test_mutual_loss_is_exact_and_user_targets_are_item_means():
    ev = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    tv = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    eu = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    tu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # items: (1 + 4) / 2; users: (1 + 9) / 2
    assert float(mutual_loss(eu, ev, tu, tv)) == pytest.approx(2.5 + 5.0)
    # targets: reps that map exactly; user 0 has items 0 and 2, user 1 item 1, user 2 nothing
    reps = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    items = reps @ torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    t_items, t_users = mutual_targets(reps, items, torch.arange(3), torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]),
                                      num_users=3, ridge=1e-9)
    assert torch.allclose(t_items, items, atol=1e-4)
    assert torch.allclose(t_users, torch.tensor([[2.0, 1.5], [0.0, 3.0], [0.0, 0.0]]), atol=1e-4)


def _planted(tmp_path):
    from ckf_dist.cf.reader import read_interactions
    from ckf_dist.cf.testdata import write_planted

    root = str(tmp_path / "planted")
    write_planted(root, num_users=120, num_items=80, per_user=16)
    return read_interactions(root, engine="arrow")


def _unexplained(reps: np.ndarray, items: np.ndarray, fit: np.ndarray, ridge: float) -> float:
    """Share of the (centred) CF item vectors that the ridge map from the representations does not explain."""
    r, e = torch.from_numpy(reps[fit]), torch.from_numpy(items[fit])
    w, b = ridge_map(r, e, ridge)
    resid = e - (r @ w + b)
    return float(resid.pow(2).sum() / (e - e.mean(0)).pow(2).sum())


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_the_regulariser_pulls_the_cf_vectors_toward_the_mapped_representations(tmp_path, model):
    from ckf_dist.cf.trainer import train_cf

    data = _planted(tmp_path)
    reps = np.random.default_rng(3).normal(size=(data.num_items, 16)).astype(np.float32)  # unrelated to the data
    cfg = load_config(["cf.epochs=6", "cf.batch_size=512", f"cf.model={model}", "cf.patience=100"]).cf
    plain = train_cf(data, cfg, progress=lambda m: None)
    cfg.mutual_weight = 1.0
    pulled = train_cf(data, cfg, progress=lambda m: None, reps=reps)
    fit = plain.item_ids
    before = _unexplained(reps, plain.item_table, fit, cfg.mutual_ridge)
    after = _unexplained(reps, pulled.item_table, fit, cfg.mutual_ridge)
    assert after < 0.8 * before, (before, after)
    assert all("mutual_loss" in row for row in pulled.history) and "mutual_loss" not in plain.history[0]
    # weight 0 is the plain run exactly (same seed, same batches, the same sampler draws)
    cfg.mutual_weight = 0.0
    zero = train_cf(data, cfg, progress=lambda m: None, reps=reps)
    np.testing.assert_array_equal(zero.item_table, plain.item_table)
    with pytest.raises(ValueError, match="80 items"):
        train_cf(data, cfg, progress=lambda m: None, reps=reps[:10])


# --------------------------------------------------------------------------------- finding and reading
def _write_reps(folder, n, step, hidden=4, sha=None):
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, REPR_FILE), np.full((n, hidden), float(step), np.float32))
    with open(os.path.join(folder, REPR_META), "w") as f:
        json.dump({"step": step, "num_items": n, "hidden": hidden, "data_manifest_sha256": sha}, f)


def test_find_source_newest_export_of_the_run_and_clear_errors(tmp_path):
    run = tmp_path / "runs" / "r1"
    cfg = load_config([f"checkpoint.storage_path={tmp_path / 'runs'}", "checkpoint.run_name=r1", "cf.mutual=true"])
    with pytest.raises(FileNotFoundError, match=f"{run}.*cf.mutual=true"):
        find_source(cfg)
    _write_reps(run / "checkpoint_2026-01-01_00-00-00.000000" / "adapter", 5, step=100)
    _write_reps(run / "checkpoint_2026-01-01_00-10-00.000000" / "adapter", 5, step=200)
    assert find_source(cfg).endswith("checkpoint_2026-01-01_00-10-00.000000/adapter")
    _write_reps(run / "adapter", 5, step=200)  # the published final export: preferred on a tie
    assert find_source(cfg) == str(run / "adapter")
    explicit = tmp_path / "elsewhere"
    _write_reps(explicit, 5, step=7)
    cfg.cf.mutual_source = str(explicit)
    assert find_source(cfg) == str(explicit)
    cfg.cf.mutual_source = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="cf.mutual_source"):
        find_source(cfg)


def test_load_checks_rows_and_data_set(tmp_path):
    _write_reps(tmp_path / "a", 5, step=3, sha="ab" * 32)
    got = load_item_representations(str(tmp_path / "a"), 5, data_manifest_sha256="ab" * 32)
    assert got.reps.shape == (5, 4) and got.meta["step"] == 3
    with pytest.raises(ValueError, match=f"{tmp_path / 'a'}/item_repr.npy has 5 item rows.*7 items"):
        load_item_representations(str(tmp_path / "a"), 7)
    with pytest.raises(ValueError, match="another data set"):
        load_item_representations(str(tmp_path / "a"), 5, data_manifest_sha256="cd" * 32)
    with pytest.raises(FileNotFoundError, match="no item_repr.npy"):
        load_item_representations(str(tmp_path / "nothing"), 5)


def test_config_validation_names_the_key():
    assert load_config([]).cf.mutual is False
    with pytest.raises(ConfigError, match="cf.mutual_weight"):
        load_config(["cf.mutual_weight=-1"])
    with pytest.raises(ConfigError, match="cf.mutual_ridge"):
        load_config(["cf.mutual_ridge=0"])
    with pytest.raises(ConfigError, match="cf.mutual_batch_size"):
        load_config(["cf.mutual_batch_size=0"])


# ------------------------------------------------------------------------------ the export (tiny model)
def _args(root) -> list[str]:
    return [f"data.path={root}/data", "data.num_users=40", "data.num_items=60", "data.interactions_per_user=12",
            "data.num_candidates=4", "cf.reader=arrow", "cf.epochs=3", "cf.dim=8", "model.tiny.vocab_size=400",
            "model.tiny.num_layers=1", "model.tiny.hidden_size=16", "lora.rank=4", "lora.alpha=8", "checkpoint.run_name=mutual-test",
            f"checkpoint.storage_path={root}/runs", "cf.mutual=true", "cf.mutual_batch_size=8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared small data set, a first CF version, and a tiny CKF model with non-zero adapters."""
    from ckf_dist.cf_refresh import refresh_once
    from ckf_dist.data.prepare import prepare
    from ckf_dist.data.streaming import read_manifest
    from ckf_dist.train import build_tokenizer
    from ckf_dist.worker import build_ckf_model, load_cf_tables

    root = tmp_path_factory.mktemp("mutual")
    cfg = load_config(_args(root))
    prepare(cfg, progress=lambda m: None)
    cfg.cf.mutual = False
    v1 = refresh_once(cfg, progress=lambda m: None)
    cfg.cf.mutual = True
    tok = build_tokenizer(cfg)
    version, users, items = load_cf_tables(cfg, None, read_manifest(cfg))
    model = build_ckf_model(cfg, tok, users, items)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero LoRA B and a perturbed mapping, as after training
        for _, p in model.trainable_named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return root, cfg, tok, model, v1


def test_item_representations_shape_determinism_and_soft_token(tiny):
    from ckf_dist.mutual import item_titles

    _, cfg, tok, model, _ = tiny
    titles = item_titles(cfg)
    assert len(titles) == 60
    model.train()
    a = item_representations(model, tok, titles, batch_size=8)
    assert model.training  # mode restored
    assert a.shape == (60, model.llm.config.hidden_size) and a.dtype == np.float32
    b = item_representations(model, tok, titles, batch_size=60)  # other padding: the same up to float noise
    np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_array_equal(a, item_representations(model, tok, titles, batch_size=8))  # no dropout
    assert np.abs(a[0] - a[1]).max() > 1e-3
    # the item's <cf> soft token is in the prompt: changing item 3's CF row changes row 3 only
    saved = model.item_table.clone()
    try:
        model.item_table[3] += 1.0
        c = item_representations(model, tok, titles, batch_size=8)
    finally:
        model.item_table = saved
    assert np.abs(c[3] - a[3]).max() > 1e-3
    np.testing.assert_allclose(np.delete(c, 3, 0), np.delete(a, 3, 0), atol=2e-5)


@pytest.mark.integration
def test_refresh_with_mutual_records_before_after_and_pulls_toward_targets(tiny):
    """export_adapter writes the representations; refresh_once (cf.mutual, cf.reader=arrow) finds them in the run
    folder, records before/after, and its item vectors are explained better by them than those of a refresh
    without the pull from the same previous version with the same seed."""
    from ckf_dist.cf.reader import read_interactions
    from ckf_dist.cf.store import load_version
    from ckf_dist.cf.trainer import evaluate_tables, version_tables
    from ckf_dist.cf_refresh import refresh_once
    from ckf_dist.checkpoint import WEIGHTS, export_adapter

    root, cfg, tok, model, v1 = tiny
    adapter = os.path.join(root, "runs", "mutual-test", "adapter")
    export_adapter(model, adapter, cfg, tok, {"step": 9, "cf_version": v1}, write=True)
    assert os.path.exists(os.path.join(adapter, WEIGHTS))
    meta = json.load(open(os.path.join(adapter, REPR_META)))
    assert meta["num_items"] == 60 and meta["step"] == 9 and meta["cf_version"] == v1
    assert meta["hidden"] == model.llm.config.hidden_size and len(meta["data_manifest_sha256"]) == 64
    reps = np.load(os.path.join(adapter, REPR_FILE))

    store = os.path.join(root, "data", "cf")
    plain_store = os.path.join(root, "cf_plain")
    shutil.copytree(store, plain_store)  # the same previous version (v1) for the run without the pull
    cfg.cf.mutual_weight = 1.0
    cfg.cf.epochs = 8
    lines = []
    v2 = refresh_once(cfg, progress=lines.append)
    ev = load_version(store, v2)
    rec = ev.manifest["metrics"]["mutual"]
    assert rec["source"] == adapter and rec["items"] == 60 and rec["weight"] == 1.0 and rec["source_step"] == 9
    assert rec["before"]["version"] == v1 and ev.manifest["metrics"]["warm_start"]["from_version"] == v1
    data = read_interactions(os.path.join(root, "data"), engine="arrow")
    kw = dict(max_users=cfg.cf.eval_max_users, seed=cfg.cf.seed)
    prev = load_version(store, v1)
    assert rec["before"]["auc"] == pytest.approx(evaluate_tables(*version_tables(prev, data), data, "valid", **kw)["auc"])
    assert rec["after"]["auc"] == pytest.approx(ev.manifest["metrics"]["auc"], abs=1e-9)  # same evaluation
    assert rec["after"]["recall@20"] == pytest.approx(ev.manifest["metrics"]["recall@20"], abs=1e-9)
    assert any("mutual: CF-only valid metrics before" in line for line in lines)

    cfg_plain = load_config(_args(root) + [f"cf.embeddings_path={plain_store}", "cf.epochs=8", "cf.mutual=false"])
    v2_plain = refresh_once(cfg_plain, progress=lambda m: None)
    plain = load_version(plain_store, v2_plain)
    assert "mutual" not in plain.manifest["metrics"]
    assert plain.manifest["metrics"]["warm_start"]["from_version"] == v1
    _, items_m = version_tables(ev, data)
    _, items_p = version_tables(plain, data)
    fit = ev.item_ids
    # Measured over the fixture's perturbation seeds 5, 6, 7 (2026-11-27, after the task slots became six, which
    # changed the perturbation draws): ratio 0.82, 0.77, 0.74 at weight 1.0 (0.81, 0.78 at 3.0): the first bound,
    # 0.8, calibrated on one draw, sat inside that spread; 0.9 keeps the property (explained clearly better)
    # with a margin over every draw seen.
    assert (_unexplained(reps, items_m, fit, cfg.cf.mutual_ridge)
            < 0.9 * _unexplained(reps, items_p, fit, cfg.cf.mutual_ridge))

    # reps for another catalogue size: a clear error naming the file, nothing published
    np.save(os.path.join(adapter, REPR_FILE), reps[:20])
    with pytest.raises(ValueError, match="item_repr.npy has 20 item rows"):
        refresh_once(cfg, progress=lambda m: None)
    assert load_version(store).version == v2


def test_a_training_runs_bootstrap_refresh_runs_without_the_pull(tiny, tmp_path):
    """ensure_embeddings (a training run's first CF version) cannot use cf.mutual: no adapter exists yet."""
    from ckf_dist.cf.store import load_version
    from ckf_dist.cf_refresh import ensure_embeddings, refresh_once
    from ckf_dist.data.streaming import read_manifest

    root, _, _, _, _ = tiny
    cfg = load_config(_args(root) + [f"cf.embeddings_path={tmp_path / 'cf'}",
                                     f"checkpoint.storage_path={tmp_path / 'no_runs'}"])
    with pytest.raises(FileNotFoundError, match="no_runs"):  # the refresh job itself insists
        refresh_once(cfg, progress=lambda m: None)
    lines = []
    version = ensure_embeddings(cfg, read_manifest(cfg), progress=lines.append)
    assert "mutual" not in load_version(str(tmp_path / "cf"), version).manifest["metrics"]
    assert any("without cf.mutual" in line for line in lines) and cfg.cf.mutual  # the caller's config untouched


def test_find_and_load_from_s3(s3_server, tmp_path):
    """A run folder on S3: the newest checkpoint export is found and read back through ckf_dist.data.io."""
    import pyarrow.fs as pafs

    from ckf_dist.data import io

    local = tmp_path / "run"
    _write_reps(local / "checkpoint_2026-01-01_00-00-00.000000" / "adapter", 6, step=4)
    _write_reps(local / "checkpoint_2026-01-02_00-00-00.000000" / "adapter", 6, step=8)
    fs, base = io.get_filesystem("s3://ckf-test/mutual-runs/r2")
    pafs.copy_files(str(local), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    cfg = load_config(["checkpoint.storage_path=s3://ckf-test/mutual-runs", "checkpoint.run_name=r2"])
    source = find_source(cfg)
    assert source == "s3://ckf-test/mutual-runs/r2/checkpoint_2026-01-02_00-00-00.000000/adapter"
    got = load_item_representations(source, 6)
    assert got.reps.shape == (6, 4) and float(got.reps[0, 0]) == 8.0 and got.source == source
