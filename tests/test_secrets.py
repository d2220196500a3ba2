"""S3 credentials never reach a written file: the data manifest, the CF embedding version, the exported adapter
(``checkpoint.export_adapter`` writes ``redacted(cfg)``) and the evaluation report (``evaluate.config_snapshot``);
nor a log line or a printed progress line. Secrets come from the config (static keys) and from the environment
(keys + the session token of temporary STS credentials, which ``ckf_dist.data.io`` passes to Arrow). The
integration test at the end does the same for a short training run against the moto S3 server: every object it
wrote (data, CF version, tiny base, checkpoints, adapter, metrics), Ray's session folder (all logs) and the
console output."""
from __future__ import annotations

import contextlib
import io as _io
import json
import logging
import pickle
import os
import shutil
import tempfile

import pytest
import torch
from omegaconf import OmegaConf

from ckf_dist.config import load_config

ACCESS_KEY = "AKIAEXAMPLEKEYID4711"
SECRET_KEY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ENV_ACCESS_KEY = "ASIAENVEXAMPLEKEY815"
ENV_SECRET_KEY = "EnvSecret/STS/K7MDENG+bPxRfiCYEXAMPLE815"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE//SessionToken+815="
SECRETS = (ACCESS_KEY, SECRET_KEY, ENV_ACCESS_KEY, ENV_SECRET_KEY, SESSION_TOKEN)
ENDPOINT = "http://127.0.0.1:9"  # non-secret settings stay (and prove the config really was written)


@contextlib.contextmanager
def _captured_output():
    """Everything printed (stdout, stderr) and every log record at DEBUG and above, as one text."""
    out = _io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _files_containing(root, needle: str) -> list[str]:
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):  # Ray's sockets, links
                continue
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
    with pytest.MonkeyPatch.context() as mp, _captured_output() as out:
        mp.setenv("AWS_ACCESS_KEY_ID", ENV_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET_KEY)
        mp.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
        cfg = load_config([f"data.path={root}/data", "data.num_users=30", "data.num_items=40",
                           "data.interactions_per_user=8", "cf.reader=arrow", "cf.epochs=1",
                           f"data.s3.access_key_id={ACCESS_KEY}", f"data.s3.secret_access_key={SECRET_KEY}",
                           f"data.s3.endpoint_url={ENDPOINT}", "data.s3.region=eu-west-3"])
        prepare(cfg, progress=print)
        version = refresh_once(cfg, progress=print)
        tok = build_tiny_tokenizer(["The user <cf> rated: alpha: 4. Answer Yes or No."], 300)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        export_adapter(model, str(root / "adapter"), cfg, tok, {"step": 3, "cf_version": version}, write=True)
        write_report({"schema": "ckf-eval-report/1", "config": config_snapshot(cfg)}, str(root / "report.json"))
    (root / "console.log").write_text(out.getvalue())
    return root, cfg


def test_no_written_file_or_output_line_contains_the_credentials(written):
    root, cfg = written
    for secret in SECRETS:
        assert _files_containing(root, secret) == [], secret
    assert "[cf_refresh]" in (root / "console.log").read_text()  # the output was captured
    # not vacuous: the files that carry a config snapshot were scanned (they hold the endpoint)
    assert {"adapter/adapter_config.json", "report.json"} <= set(_files_containing(root, ENDPOINT))
    assert os.path.exists(root / "data" / "_manifest.json")
    # and the caller's config keeps its credentials (redaction works on a copy)
    assert (cfg.data.s3.access_key_id, cfg.data.s3.secret_access_key) == (ACCESS_KEY, SECRET_KEY)


def test_exported_config_keeps_everything_but_the_credentials(written):
    root, cfg = written
    meta = json.loads((root / "adapter" / "adapter_config.json").read_text())
    snap = OmegaConf.to_container(OmegaConf.create(meta["config_yaml"]))
    retry = {"retry_attempts": 10, "outage_wait_s": 900.0}  # not secrets: kept
    assert snap["data"]["s3"] == {"endpoint_url": ENDPOINT, "region": "eu-west-3", "access_key_id": "",
                                  "secret_access_key": "", **retry}
    assert snap["data"]["num_users"] == 30 and meta["step"] == 3
    report = json.loads((root / "report.json").read_text())
    assert report["config"]["data"]["s3"] == {"endpoint_url": ENDPOINT, "region": "eu-west-3",
                                              "access_key_id": "***", "secret_access_key": "***", **retry}


def test_config_snapshot_without_credentials_is_unchanged():
    from ckf_dist.evaluate import config_snapshot

    snap = config_snapshot(load_config([]))
    assert snap["data"]["s3"]["access_key_id"] == "" and snap["data"]["s3"]["secret_access_key"] == ""


@pytest.mark.integration
def test_a_short_training_run_writes_and_logs_no_secret(s3_server, monkeypatch, capfd):
    """prepare -> CF refresh -> tiny-base pretraining -> 2 steps of 2-worker ZeRO-3 training -> checkpoint,
    adapter export and metrics, all in the moto S3 bucket, with temporary credentials (keys + session token)
    in the environment: the path that carries them inside every S3 filesystem object to the Ray workers (the
    config's static keys are covered by the tests above). Then no S3 object, no file in Ray's session folder
    (driver, worker and system logs) and no console line holds any of the secrets."""
    import pyarrow.fs as pafs
    import ray

    from ckf_dist.data import io
    from ckf_dist.train import CPU_ENV, run

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    prefix = "s3://ckf-test/secrets-run"
    cfg = load_config([
        f"data.s3.endpoint_url={s3_server}", "data.s3.region=us-east-1",
        f"data.path={prefix}/data", "data.num_users=40", "data.num_items=30", "data.interactions_per_user=10",
        f"checkpoint.storage_path={prefix}/runs", "checkpoint.run_name=secrets", "checkpoint.every_steps=2",
        "training.max_steps=2", "training.batch_size=4", "training.log_every=1", "training.eval_rows=8",
        "cf.epochs=2", "model.tiny.pretrain_steps=5", "model.tiny.pretrain_batch_size=8", "ray.num_workers=2"])
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp,
             runtime_env={"env_vars": dict(CPU_ENV)})
    try:
        result = run(cfg)
    finally:
        ray.shutdown()
    try:
        assert result.metrics["step"] == 2
        fs, root = io.get_filesystem(prefix, cfg.data.s3)
        shipped = pickle.loads(pickle.dumps(fs))  # what Ray ships to the workers (io.RetryingS3FileSystem)
        assert pafs.S3FileSystem.__reduce__(shipped)[1][0]["session_token"] == SESSION_TOKEN  # the run used it
        objects = [f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if f.type == pafs.FileType.File]
        assert any(p.endswith("adapter/adapter_config.json") for p in objects), objects
        assert any(p.endswith("metrics.json") for p in objects) and any("checkpoint" in p for p in objects)
        leaks = []
        for path in objects:
            with fs.open_input_stream(path) as f:
                data = f.read()
            leaks += [(path, s) for s in SECRETS if s.encode() in data]
        for secret in SECRETS:
            leaks += [(f"ray session: {p}", secret) for p in _files_containing(ray_tmp, secret)]
        out, err = capfd.readouterr()
        assert "step" in out + err  # the run's console output was captured
        leaks += [("console", s) for s in SECRETS if s in out + err]
        assert leaks == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
