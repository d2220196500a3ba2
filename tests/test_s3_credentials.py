"""S3 credentials (issue 13, finding 7): which credentials ``ckf_dist.data.io.get_filesystem`` hands to Arrow,
checked on the filesystem object and on the requests that the moto S3 server received (moto accepts any key and
session token; its request recorder keeps the headers, so the test sees what really went over the wire).

Order: config keys > environment keys (+ AWS_SESSION_TOKEN: STS / assumed-role / SSO credentials) > Arrow's
default AWS credential chain (IRSA web identity, profiles, instance roles), never a mix."""
from __future__ import annotations

import json

import pytest

from ckf_dist.config import ConfigError, S3Config, load_config
from ckf_dist.data import io

ENV_KEY = "ASIAENVSTSKEY0000001"
ENV_SECRET = "env/secret+STS+key/000000000000000000001"
ENV_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLE-session-token-0001"
CFG_KEY = "AKIACONFIGSTATIC0001"
CFG_SECRET = "config/static/secret/0000000000000000001"
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


def _credentials(fs) -> dict:
    """The credential options the S3FileSystem was built with (what it pickles to Ray workers too); None = not
    given (Arrow reports an absent token as "" or None depending on how the keys were passed)."""
    import pickle

    import pyarrow.fs as pafs

    # the copy Ray ships to its workers (io.RetryingS3FileSystem pickles its constructor arguments), read back
    # through Arrow's own options
    opts = pafs.S3FileSystem.__reduce__(pickle.loads(pickle.dumps(fs)))[1][0]
    out = {k: opts[k] or None for k in ("access_key", "secret_key", "session_token")}
    return {**out, "anonymous": opts["anonymous"]}


@pytest.fixture
def recorded(s3_server, tmp_path, monkeypatch):
    """Records the requests the moto server receives while the test body runs; yields a function that returns
    them (method, url, headers) for the paths under ``ckf-test/creds``."""
    import requests
    from moto.moto_api import recorder

    monkeypatch.setattr(recorder, "_location", str(tmp_path / "moto_recording"))
    requests.post(f"{s3_server}/moto-api/recorder/reset-recording", timeout=10)
    requests.post(f"{s3_server}/moto-api/recorder/start-recording", timeout=10)

    def requests_seen():
        requests.post(f"{s3_server}/moto-api/recorder/stop-recording", timeout=10)
        lines = (tmp_path / "moto_recording").read_text().splitlines()
        return [e for e in map(json.loads, lines) if "/ckf-test/creds" in e["url"]]

    yield requests_seen
    requests.post(f"{s3_server}/moto-api/recorder/stop-recording", timeout=10)


def _write_and_read(uri: str, s3=None) -> None:
    fs, path = io.get_filesystem(uri, s3)
    io.write_bytes(fs, path, b"payload")
    assert io.read_bytes(fs, path) == b"payload"


def _signed_with(req: dict) -> tuple[str, str]:
    """(access key id in the SigV4 Authorization header, X-Amz-Security-Token header)."""
    auth = req["headers"].get("Authorization", "")
    key = auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""
    return key, req["headers"].get("X-Amz-Security-Token", "")


def test_environment_session_token_reaches_the_filesystem_and_every_request(s3_server, recorded, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    fs, _ = io.get_filesystem("s3://ckf-test/creds/sts.bin")
    assert _credentials(fs) == {"access_key": ENV_KEY, "secret_key": ENV_SECRET, "session_token": ENV_TOKEN,
                                "anonymous": False}
    _write_and_read("s3://ckf-test/creds/sts.bin")
    seen = recorded()
    assert {r["method"] for r in seen} >= {"PUT", "GET"}, seen
    assert {_signed_with(r) for r in seen} == {(ENV_KEY, ENV_TOKEN)}


def test_config_keys_win_and_never_borrow_the_environments_session_token(s3_server, recorded, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)  # belongs to the environment's key, not the config's
    s3 = S3Config(access_key_id=CFG_KEY, secret_access_key=CFG_SECRET)
    fs, _ = io.get_filesystem("s3://ckf-test/creds/static.bin", s3)
    assert _credentials(fs) == {"access_key": CFG_KEY, "secret_key": CFG_SECRET, "session_token": None,
                                "anonymous": False}
    _write_and_read("s3://ckf-test/creds/static.bin", s3)
    assert {_signed_with(r) for r in recorded()} == {(CFG_KEY, "")}


def test_without_keys_arrow_resolves_the_default_credential_chain(s3_server, recorded, monkeypatch, tmp_path):
    """No key in the config or the environment: nothing explicit is passed (Arrow's default chain, which also
    covers IRSA's web identity). Shown working with the chain's profile source: the requests carry the
    profile's temporary key and token."""
    for var in CREDENTIAL_ENV:
        monkeypatch.delenv(var, raising=False)
    fs, _ = io.get_filesystem("s3://ckf-test/creds/chain.bin")
    assert _credentials(fs) == {"access_key": None, "secret_key": None, "session_token": None, "anonymous": False}
    creds = tmp_path / "credentials"
    creds.write_text("[ckf]\naws_access_key_id = ASIAPROFILE000000001\naws_secret_access_key = profile-secret\n"
                     "aws_session_token = profile-token-0001\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_PROFILE", "ckf")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _write_and_read("s3://ckf-test/creds/chain.bin")
    assert {_signed_with(r) for r in recorded()} == {("ASIAPROFILE000000001", "profile-token-0001")}


def test_keys_from_the_environment_are_never_mixed_with_the_configs(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    opts = io.s3_options(S3Config(access_key_id=CFG_KEY, secret_access_key=CFG_SECRET))
    assert (opts["access_key_id"], opts["secret_access_key"], opts["session_token"]) == (CFG_KEY, CFG_SECRET, "")
    with pytest.raises(ConfigError, match="data.s3.access_key_id and data.s3.secret_access_key go together"):
        load_config([f"data.s3.access_key_id={CFG_KEY}"])
    with pytest.raises(ConfigError, match="go together"):
        load_config([f"data.s3.secret_access_key={CFG_SECRET}"])
