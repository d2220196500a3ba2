"""The refresh job: one-shot and loop modes, warm start, manifest contents, Ray Data over S3, the CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ckf_dist import cf_refresh
from ckf_dist.cf.store import latest_version, list_versions, load_version
from ckf_dist.cf.testdata import write_planted
from ckf_dist.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_interval():
    assert cf_refresh.parse_interval("6h") == 21600
    assert cf_refresh.parse_interval("1h30m") == 5400
    assert cf_refresh.parse_interval("45") == 45
    for bad in ("6x", "h", "0s", "-1h", "6h junk"):
        with pytest.raises(ValueError):
            cf_refresh.parse_interval(bad)


@pytest.fixture()
def dataset(tmp_path):
    root = str(tmp_path / "data")
    write_planted(root)  # the embedded default's size: 300 users, 200 items, ~6k interactions
    return root


def test_refresh_once_publishes_and_warm_starts(dataset):
    cfg = load_config([f"data.path={dataset}", "cf.reader=arrow", "cf.keep_versions=2"])
    lines = []
    v1 = cf_refresh.refresh_once(cfg, progress=lines.append)  # (its speed is benchmarks/bench_cf_refresh.py's job)
    root = dataset + "/cf"
    assert latest_version(root) == v1
    ev = load_version(root)
    m = ev.manifest
    assert m["model_type"] == "mf" and m["dim"] == cfg.cf.dim == ev.dim
    assert m["num_user_rows"] == 300 and m["num_item_rows"] == 200
    assert m["data_snapshot"]["num_users"] == 300 and m["data_snapshot"]["per_split"]["valid"] == 300
    assert len(m["data_snapshot"]["files_sha256"]) == 64
    assert m["metrics"]["auc"] > 0.75 and "recall@20" in m["metrics"] and m["metrics"]["warm_start"] == {}
    assert any("epoch 1/" in line for line in lines) and any("published" in line for line in lines)
    v2 = cf_refresh.refresh_once(cfg, progress=lines.append)
    m2 = load_version(root).manifest
    assert v2 > v1 and m2["metrics"]["warm_start"]["from_version"] == v1
    assert m2["metrics"]["warm_start"]["users"] == 300
    cf_refresh.refresh_once(cfg, progress=lines.append)
    assert len(list_versions(root)) == 2


def test_main_one_shot_loop_and_bad_args(dataset, tmp_path, capsys):
    out = str(tmp_path / "emb")
    common = [f"data.path={dataset}", "cf.reader=arrow", f"cf.embeddings_path={out}", "cf.epochs=3"]
    assert cf_refresh.main(common) == 0
    assert len(list_versions(out)) == 1
    assert cf_refresh.main(["--every", "0.1s", "--max-runs", "2"] + common) == 0
    assert len(list_versions(out)) == 3
    assert cf_refresh.main(["--every", "soon"] + common) == 2
    assert cf_refresh.main(common + ["cf.model=nope"]) == 2
    assert cf_refresh.main([f"data.path={tmp_path}/missing", "cf.reader=arrow"]) == 1
    err = capsys.readouterr().err
    assert "cannot read interval" in err and "cf.model" in err and "no interaction shards" in err


def test_module_entry_point(dataset, tmp_path):
    out = str(tmp_path / "emb")
    proc = subprocess.run([sys.executable, "-m", "ckf_dist.cf_refresh", f"data.path={dataset}", "cf.reader=arrow",
                           f"cf.embeddings_path={out}", "cf.model=lightgcn", "cf.epochs=5"],
                          capture_output=True, text=True, cwd=REPO, timeout=900)  # a hang guard only
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[cf] epoch 5/5" in proc.stdout and "published" in proc.stdout
    assert load_version(out).manifest["model_type"] == "lightgcn"


@pytest.mark.integration
def test_refresh_with_ray_data_on_s3(s3_server, tmp_path):
    """Interactions on S3 read with Ray Data (one small local Ray), embeddings published to S3."""
    ray = pytest.importorskip("ray")
    data = "s3://ckf-test/refresh/data"
    write_planted(data, rows_per_file=2000)
    cfg = load_config([f"data.path={data}", "cf.reader=ray", "cf.epochs=5", "ray.local_num_cpus=2"])
    started_here = not ray.is_initialized()
    try:
        version = cf_refresh.refresh_once(cfg, progress=lambda _m: None)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    ev = load_version(data + "/cf")
    assert ev.version == version and ev.manifest["data_snapshot"]["num_files"] == 3
    assert ev.manifest["data_snapshot"]["num_rows"] == ev.manifest["data_snapshot"]["per_split"]["train"] + 600
