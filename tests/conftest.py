"""Shared fixtures: a real S3-compatible server on loopback, the Pythia tokenizer, a tiny Pythia folder."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "redpajama-sample" / "slimpajama_sample.jsonl"
TOKENIZER = ROOT / "cpt" / "assets" / "tokenizer.json"

_CLOUD_VARS = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server on a fixed loopback port; ``stop`` and ``start`` simulate an outage (moto keeps its
    buckets in process memory, so they survive a restart)."""

    def __init__(self, port: int):
        self.port, self.server = port, None
        self.endpoint = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def outage(self, seconds: float) -> threading.Thread:
        """Stop the server now and start it again ``seconds`` later, in the background."""
        self.stop()

        def restart():
            time.sleep(seconds)
            self.start()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread


@pytest.fixture(scope="session")
def moto() -> MotoServer:
    """moto's S3 server in HTTP mode on 127.0.0.1, with dummy credentials and cloud variables cleared."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for var in _CLOUD_VARS:
        os.environ.pop(var, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    server = MotoServer(_free_port())
    server.start()
    os.environ["S3_ENDPOINT_URL"] = server.endpoint
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(moto) -> str:
    """The loopback S3 server's endpoint URL."""
    return moto.endpoint


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; yields ``s3://<bucket>``."""
    import boto3

    name = f"cpt-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_CACHE", str(tmp_path / "cpt-cache"))


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    return str(TOKENIZER)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="session")
def sample_jsonl() -> Path:
    if not SAMPLE.is_file():
        pytest.skip(f"real RedPajama sample not present at {SAMPLE} (../shared/data is absent)")
    return SAMPLE


@pytest.fixture(scope="session")
def tiny_pythia(tmp_path_factory) -> str:
    """A 2-layer GPT-NeoX with Pythia's vocabulary, saved like a Pythia step folder."""
    from cpt.model import save_tiny_pythia

    out = tmp_path_factory.mktemp("pythia-tiny") / "step143000"
    save_tiny_pythia(str(out), seed=0)
    return str(out)


@pytest.fixture(scope="session")
def tiny_project():
    """``cpt.data.synthetic.tiny_project``, for module-scoped fixtures."""
    from cpt.data.synthetic import tiny_project

    return tiny_project
