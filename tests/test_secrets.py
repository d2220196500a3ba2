"""S3 credentials never reach a written file: the data manifest, the CF embedding version, the exported adapter
(``checkpoint.export_adapter`` writes ``redacted(cfg)``) and the evaluation report (``evaluate.config_snapshot``)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from ckf_dist.config import load_config

ACCESS_KEY = "AKIAEXAMPLEKEYID4711"
SECRET_KEY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ENDPOINT = "http://127.0.0.1:9"  # non-secret settings stay (and prove the config really was written)


def _files_containing(root, needle: str) -> list[str]:
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                if needle.encode() in f.read():
                    hits.append(os.path.relpath(path, root))
    return hits


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every artefact a run writes, produced with credentials set in the config."""
    from ckf_dist.cf_refresh import refresh_once
    from ckf_dist.checkpoint import export_adapter
    from ckf_dist.data.prepare import prepare
    from ckf_dist.evaluate import config_snapshot, write_report
    from ckf_dist.model.llm import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("secrets")
    cfg = load_config([f"data.path={root}/data", "data.num_users=30", "data.num_items=40",
                       "data.interactions_per_user=8", "cf.reader=arrow", "cf.epochs=1",
                       f"data.s3.access_key_id={ACCESS_KEY}", f"data.s3.secret_access_key={SECRET_KEY}",
                       f"data.s3.endpoint_url={ENDPOINT}", "data.s3.region=eu-west-3"])
    prepare(cfg, progress=lambda m: None)
    version = refresh_once(cfg, progress=lambda m: None)
    tok = build_tiny_tokenizer(["The user <cf> rated: alpha: 4. Answer Yes or No."], 300)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    export_adapter(model, str(root / "adapter"), cfg, tok, {"step": 3, "cf_version": version}, write=True)
    write_report({"schema": "ckf-eval-report/1", "config": config_snapshot(cfg)}, str(root / "report.json"))
    return root, cfg


def test_no_written_file_contains_the_credentials(written):
    root, cfg = written
    assert _files_containing(root, ACCESS_KEY) == []
    assert _files_containing(root, SECRET_KEY) == []
    # not vacuous: the files that carry a config snapshot were scanned (they hold the endpoint)
    assert {"adapter/adapter_config.json", "report.json"} <= set(_files_containing(root, ENDPOINT))
    assert os.path.exists(root / "data" / "_manifest.json")
    # and the caller's config keeps its credentials (redaction works on a copy)
    assert (cfg.data.s3.access_key_id, cfg.data.s3.secret_access_key) == (ACCESS_KEY, SECRET_KEY)


def test_exported_config_keeps_everything_but_the_credentials(written):
    root, cfg = written
    meta = json.loads((root / "adapter" / "adapter_config.json").read_text())
    snap = OmegaConf.to_container(OmegaConf.create(meta["config_yaml"]))
    assert snap["data"]["s3"] == {"endpoint_url": ENDPOINT, "region": "eu-west-3", "access_key_id": "",
                                  "secret_access_key": ""}
    assert snap["data"]["num_users"] == 30 and meta["step"] == 3
    report = json.loads((root / "report.json").read_text())
    assert report["config"]["data"]["s3"] == {"endpoint_url": ENDPOINT, "region": "eu-west-3",
                                              "access_key_id": "***", "secret_access_key": "***"}


def test_config_snapshot_without_credentials_is_unchanged():
    from ckf_dist.evaluate import config_snapshot

    snap = config_snapshot(load_config([]))
    assert snap["data"]["s3"]["access_key_id"] == "" and snap["data"]["s3"]["secret_access_key"] == ""
