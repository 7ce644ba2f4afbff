"""Shared fixtures: a real S3-compatible server on loopback, the Pythia tokenizer, a tiny Pythia folder."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest

from cpt.run.cpu import KEEP_FREED_MEMORY

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "redpajama-sample" / "slimpajama_sample.jsonl"
TOKENIZER = ROOT / "cpt" / "assets" / "tokenizer.json"

# the training subprocesses that tests launch keep freed memory as the quickstart's do (faster on the CPU; the
# numbers are the same)
for _key, _value in KEEP_FREED_MEMORY.items():
    os.environ.setdefault(_key, _value)

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


class CuttingProxy:
    """A TCP proxy in front of the S3 server that drops connections in the middle of a transfer.

    ``cut("down", 1 << 20)`` resets the first connection that carries more than 1 MiB from the server to the
    client (a download), once; ``"up"`` counts client-to-server bytes (an upload). Cuts are used in order."""

    def __init__(self, upstream_port: int):
        self.upstream, self.cuts, self.done = upstream_port, [], []
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, direction: str, after: int) -> None:
        with self.lock:
            self.cuts.append((direction, after))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, "up", pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down", pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, pair) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                with self.lock:
                    cut = self.cuts[0] if self.cuts and self.cuts[0][0] == direction else None
                    fire = cut is not None and sent + len(data) > cut[1]
                    if fire:
                        self.done.append(self.cuts.pop(0))
                if fire:
                    dst.sendall(data[: max(cut[1] - sent, 0)])
                    for s in pair:  # RST, as a dropped network path looks to the peers
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.shutdown(socket.SHUT_RD)  # wakes the other pump, blocked in recv
                        s.close()
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def cutting_proxy(moto, monkeypatch) -> CuttingProxy:
    """S3 calls in this test go through a ``CuttingProxy`` to the moto server."""
    proxy = CuttingProxy(moto.port)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.close()


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
    from cpt.pythia import save_tiny_pythia

    out = tmp_path_factory.mktemp("pythia-tiny") / "step143000"
    save_tiny_pythia(str(out), seed=0)
    return str(out)


@pytest.fixture(scope="session")
def tiny_project():
    """``cpt.data.synthetic.tiny_project``, for module-scoped fixtures."""
    from cpt.data.synthetic import tiny_project

    return tiny_project


@pytest.fixture(scope="session")
def run_project(tmp_path_factory, tiny_project):
    """The project the resume and stages tests train on: two one-domain splits, 120 training documents."""
    domains = {"upstream": {"Pile-CC": "prose"}, "downstream": {"Github": "code"}}
    return tiny_project(tmp_path_factory.mktemp("runs"), domains, {"train": 120, "val": 10})


@pytest.fixture(scope="session")
def uninterrupted(run_project) -> str:
    """One finished 16-batch run of ``run_project`` named ``trunk`` (a checkpoint every 4 batches, every trained
    sample logged), trained once: the end every interrupted run of the resume tests must reach, and the trunk the
    stages tests branch from. No test writes into it."""
    from test_resume import finish, launch

    folder = str(run_project / "trunk-checkpoints")
    finish(launch(run_project, "trunk", folder))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_project):
    """A tiny project (two one-domain splits, a 128-position model) for checking configs and plans."""
    domains = {"upstream": {"Pile-CC": "prose"}, "downstream": {"Pile-CC": "prose"}}
    return tiny_project(tmp_path_factory.mktemp("cfg"), domains, {"train": 20, "val": 20}, model_seq_len=128)


def load_tiny(tiny: Path, *overrides: str):
    """``yamls/tiny-cpu.yaml`` pointed at the ``tiny`` project, with overrides."""
    from cpt import config

    return config.load(
        str(ROOT / "yamls" / "tiny-cpu.yaml"),
        [
            f"variables.data={tiny / 'data'}",
            f"variables.model={tiny / 'model'}",
            f"variables.save_folder={tiny / 'ck'}",
            f"cpt.run_dir={tiny / 'runs'}",
            *overrides,
        ],
    )
