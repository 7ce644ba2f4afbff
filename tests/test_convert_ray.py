"""The conversion on a real local Ray cluster, S3 to S3 through the loopback server: the same bytes as the local
engine, a worker killed mid-task, a driver killed and relaunched, a bad line."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import prewarmed
import pytest

from cpt.data import synthetic
from cpt.data.convert import DOMAIN_KEYS, convert
from cpt.data.file_task import FAULT, MARKERS
from cpt.io import storage

ray = pytest.importorskip("ray", reason="Ray is in the .[ray] and .[dev] extras")

ROOT = Path(__file__).resolve().parents[1]
KEY = DOMAIN_KEYS["pile"]
DOMAINS = {"Pile-CC": "prose", "Github": "code", "ArXiv": "science"}
FILES = 6


@pytest.fixture(scope="module")
def cluster(moto):
    """One local Ray for the module (2 CPUs); its workers inherit the loopback S3's settings."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, moto) -> str:
    """Six JSONL files of three domains each (two compressed), uploaded to their own bucket: the input glob."""
    import boto3
    import zstandard

    bucket = f"cpt-ray-{os.getpid()}"
    boto3.client("s3", endpoint_url=moto.endpoint).create_bucket(Bucket=bucket)
    local = tmp_path_factory.mktemp("ray-corpus")
    for i in range(FILES):
        src = local / f"part-{i:02d}.jsonl"
        synthetic.write_jsonl(src, DOMAINS, docs=30 + 7 * i, seed=40 + i, domain_key=KEY)
        data, name = src.read_bytes(), src.name
        if i % 3 == 2:
            data, name = zstandard.ZstdCompressor().compress(data), name + ".zst"
        storage.write_bytes(f"s3://{bucket}/raw/{name}", data)
    return f"s3://{bucket}/raw/*"


def tree(url: str) -> dict[str, str]:
    """Every key under ``url`` with its content's sha256."""
    return {k: hashlib.sha256(storage.read_bytes(storage.join(url, k))).hexdigest() for k in storage.list_prefix(url)}


def run(corpus: str, out: str, **kw):
    return convert(
        [corpus], out, "train", synthetic.TOKENIZER, KEY, seq_len=128, size_limit=1 << 12, progress=False, **kw
    )


def convert_cli(cmd: list[str], env: dict) -> tuple[int, str]:
    """``python convert/pile.py ...`` to its end, forked from the prewarmed server (``tests/prewarmed.py``): its exit
    code and its output (stdout and stderr together)."""
    return prewarmed.run(cmd[1:], cwd=os.getcwd(), env=env, timeout=600)


def cli(corpus: str, out: str, *extra: str, env: dict | None = None, **popen) -> list[str]:
    cmd = [sys.executable, str(ROOT / "convert" / "pile.py"), "--input", corpus, "--output", out, "--split", "train"]
    return cmd + [
        "--tokenizer",
        synthetic.TOKENIZER,
        "--seq-len",
        "128",
        "--shard-size",
        "4096",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(corpus, s3_server) -> tuple[str, dict[str, str]]:
    """The local engine's output with one worker."""
    out = corpus.replace("/raw/*", "/local-1")
    result = run(corpus, out, workers=1)
    assert result.files_converted == FILES
    return out, tree(out)


def test_ray_writes_the_same_bytes_as_the_local_engine(corpus, reference, cluster):
    out, want = reference
    assert len([k for k in want if k.endswith(".mds")]) > 3 * FILES  # several shards per file and domain
    assert not any(k.startswith(MARKERS) for k in want)  # a complete split keeps no markers
    two = corpus.replace("/raw/*", "/local-2")
    run(corpus, two, workers=2)
    assert tree(two) == want
    on_ray = corpus.replace("/raw/*", "/ray")
    result = run(corpus, on_ray, engine="ray")
    assert tree(on_ray) == want and result.files_converted == FILES
    # the layout: each file's full samples, then each domain's tails packed in input order
    m = result.manifest
    for d in m.domains.values():
        keys = [k for k in want if k.startswith(f"train/{d.slug}/")]
        parts = sorted({k.split("/")[2] for k in keys if k.count("/") == 3})
        assert parts[-1] == "tails" and parts[:-1] == [f"f{i:05d}" for i in range(FILES)]
        assert d.tail_tokens_dropped < 128 and d.samples * 128 + d.tail_tokens_dropped == d.tokens


def test_a_worker_killed_mid_task_is_retried_and_the_bytes_are_the_same(corpus, reference, cluster, tmp_path):
    out = corpus.replace("/raw/*", "/ray-worker-killed")
    flag = tmp_path / "killed-once"
    env = {**os.environ, FAULT: f"3:{flag}"}  # the worker converting file 3 dies after writing part of it
    code, log = convert_cli(cli(corpus, out, "--engine", "ray", "--ray-address", cluster), env)
    assert code == 0, log[-3000:]
    assert flag.exists(), "the fault never fired"
    assert tree(out) == reference[1]


def test_a_killed_driver_relaunched_reuses_the_finished_tasks(corpus, reference, cluster):
    out = corpus.replace("/raw/*", "/ray-driver-killed")
    args = cli(corpus, out, "--engine", "ray", "--ray-address", cluster)
    markers = storage.join(out, "train", MARKERS)
    proc = prewarmed.shared().launch(args[1:], cwd=os.getcwd(), env=dict(os.environ))  # its own session
    deadline = time.time() + 120
    while time.time() < deadline and len(storage.list_prefix(markers)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(storage.list_prefix(markers))
    assert 2 <= done < FILES, f"the kill should land mid-way: {done} of {FILES} files were done"
    code, log = convert_cli(args, dict(os.environ))
    assert code == 0, log[-3000:]
    assert f"{done} of {FILES} files reused from a previous run (ray engine)" in log
    assert tree(out) == reference[1]


def test_a_bad_line_stops_ray_as_it_stops_the_local_engine(cluster, s3_bucket, tmp_path):
    good = b'{"text": "hello there", "meta": {"pile_set_name": "X"}}\n'
    storage.write_bytes(f"{s3_bucket}/bad/a.jsonl", good * 3)
    storage.write_bytes(f"{s3_bucket}/bad/b.jsonl", good + b'{"text": 3, "meta": {"pile_set_name": "X"}}\n')
    got = {}
    for engine in ("local", "ray"):
        extra = ["--engine", engine] + (["--ray-address", cluster] if engine == "ray" else ["--workers", "1"])
        code, log = convert_cli(cli(f"{s3_bucket}/bad/*", f"{s3_bucket}/out-{engine}", *extra), dict(os.environ))
        got[engine] = (code, log.strip().splitlines()[-1])
    assert got["ray"] == got["local"]
    assert got["ray"][0] == 2 and f"{s3_bucket}/bad/b.jsonl:2" in got["ray"][1] and "'text' is int" in got["ray"][1]
    # counted, not stopped, under --skip-bad-lines: the same counts on both engines
    counts = {}
    for engine in ("local", "ray"):
        result = convert(
            [f"{s3_bucket}/bad/*"], f"{s3_bucket}/skip-{engine}", "train", synthetic.TOKENIZER, KEY, seq_len=4,
            skip_bad_lines=True, progress=False, engine=engine, workers=1,
        )  # fmt: skip
        counts[engine] = {n: d.docs_skipped for n, d in result.manifest.domains.items()}
    assert counts["ray"] == counts["local"] == {"X": {"non_string_text": 1}}
