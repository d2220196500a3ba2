"""Shared fixtures: a real S3 endpoint (moto's server mode on 127.0.0.1), the shared real data folder."""
from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("CKF_SHARED_DATA", REPO.parent / "shared" / "data"))

# Multi-rank CPU runs (gloo) need these; set before any worker starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_dataset(name: str) -> pathlib.Path:
    """Path of a data set in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data set {name!r} not found at {path} (set CKF_SHARED_DATA to its folder)")
    return path


class MotoServer:
    """moto's S3 server on 127.0.0.1. ``stop()`` then ``start()`` simulates an outage: the new server listens on
    the same port and serves the same buckets (moto keeps its state in this process, not in the server)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self._server.start()


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(moto_server):
    """A real S3 HTTP endpoint (moto server) on 127.0.0.1 with a bucket ``ckf-test``; sets the AWS env vars."""
    endpoint = moto_server.endpoint
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="ckf-test")
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def llama():
    """A LLaMA-style sentencepiece tokenizer built in-process (tests/llama_like_tokenizer.py; no download)."""
    from tests.llama_like_tokenizer import build_llama_like_tokenizer

    return build_llama_like_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    """The project's tiny byte-level BPE tokenizer, trained on the same corpus."""
    from ckf_dist.model.llm import build_tiny_tokenizer
    from tests.llama_like_tokenizer import CORPUS

    return build_tiny_tokenizer(list(CORPUS), 300)


def pytest_collection_modifyitems(config, items):
    """Soak tests are opt-in: they run only when the marker expression names them (``-m soak``)."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in soak test: run with -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
