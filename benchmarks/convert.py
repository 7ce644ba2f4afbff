"""Conversion throughput on the real RedPajama sample, against two references, in one run.

    python benchmarks/convert.py [--copies 16] [--workers N]

The sample is replicated ``--copies`` times into as many files, so fixed start-up costs (process
spawn, importing mosaicml-streaming) are amortised as they are on a real corpus. Every rate has the
same numerator: the document tokens of the same texts (EOS excluded).

- raw: ``tokenizers.Tokenizer.encode_batch`` over all texts in memory, RAYON_NUM_THREADS=workers;
- llm-foundry: ``convert_dataset_json`` (concat 2048) over the plain JSONL, local output;
- cpt: ``cpt.data.convert.convert`` from ``.jsonl.zst`` on a loopback S3 server to MDS on that server
  (decompression, tokenization, packing, hashing and upload included).

Then peak memory of cpt's conversion at 1x, 4x and 16x the input, to show it stays flat, and on a file
with one huge line (64 MB, skipped as ``too_large`` under the default ``--max-doc-bytes``; and one just
under that limit, which is tokenized): a worker's memory is bounded by the limit, not by the input.

    python benchmarks/convert.py --huge-only     # the huge-line figures alone (no real sample needed)
    python benchmarks/convert.py --engines       # --engine ray against --engine local, S3 to S3, in one call

``--engines``: the same ``--copies`` files, zst on a loopback S3 server, converted to MDS on that server by the
local engine (``--workers`` processes) and by Ray (a local Ray with ``--workers`` CPUs, started before the clock
starts, as a cluster would be). It prints both rates, Ray's overhead, the per-core rate, each engine's peak local
disk (the cache folder, where a task's tokens and the shard being uploaded lie) and its workers' peak memory
(VmHWM of the worker processes), and the wall time and node-hours for the Pile and SlimPajama on 1, 8 and 32 nodes
of 32 cores, extrapolated from the per-core rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "redpajama-sample" / "slimpajama_sample.jsonl"
TOKENIZER = ROOT / "cpt" / "assets" / "tokenizer.json"
KEY = "meta.redpajama_set_name"

RAW = """
import json, os, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(l)["text"] for f in sys.argv[2:] for l in open(f, encoding="utf-8")]
texts = [t for t in texts if t.strip()]  # cpt counts whitespace-only documents as empty
for name in ("encode_batch", "encode_batch_fast"):
    t = time.perf_counter(); enc = getattr(tok, name)(texts, add_special_tokens=False); dt = time.perf_counter() - t
    print(json.dumps({"name": name, "tokens": sum(len(e.ids) for e in enc), "seconds": dt}))
"""

FOUNDRY = """
import json, sys, time
from llmfoundry.command_utils.data_prep.convert_dataset_json import convert_dataset_json
t = time.perf_counter()
convert_dataset_json(path=sys.argv[1], out_root=sys.argv[2], compression=None, concat_tokens=2048, split="train",
                     tokenizer=sys.argv[3], eos_text="<|endoftext|>")
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

PEAK = """
import json, resource, sys, time
from cpt.data.convert import convert
t = time.perf_counter()
r = convert(sys.argv[1:-1], sys.argv[-1], "train", "{tok}", "{key}", workers={workers}, progress=False,
            skip_bad_lines=True)
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"tokens": r.tokens, "seconds": time.perf_counter() - t, "main_mb": self_kb / 1024,
                  "worker_mb": child_kb / 1024}}))
"""


def loopback_s3():
    """moto's S3 server on 127.0.0.1 (``S3_ENDPOINT_URL`` set) with a bucket ``bench``: (server, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["S3_ENDPOINT_URL"] = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    s3.create_bucket(Bucket="bench")
    return server, s3


def run_py(code: str, *args: str, env: dict | None = None) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--huge-only", action="store_true", help="only the huge-line memory figures")
    ap.add_argument("--engines", action="store_true", help="the local engine against Ray, S3 to S3")
    args = ap.parse_args()
    if args.engines:
        return engines(args.copies, args.workers)
    if args.huge_only:
        huge_lines(Path(tempfile.mkdtemp(prefix="cpt-bench-")), max(2, args.workers))
        return
    if not SAMPLE.is_file():
        sys.exit(f"the real sample is missing: {SAMPLE}")
    import zstandard

    tmp = Path(tempfile.mkdtemp(prefix="cpt-bench-"))
    os.environ.update(
        CPT_CACHE=str(tmp / "cache"), AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1"
    )
    data = SAMPLE.read_bytes()
    plain, zst = tmp / "plain", tmp / "zst"
    plain.mkdir()
    zst.mkdir()
    for i in range(args.copies):
        (plain / f"part-{i:03d}.jsonl").write_bytes(data)
        (zst / f"part-{i:03d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    files = sorted(str(p) for p in plain.iterdir())
    print(
        f"input: {args.copies} x {SAMPLE.name} ({len(data) * args.copies / 1e6:.1f} MB), workers={args.workers}, "
        f"cores={os.cpu_count()}"
    )

    env = {**os.environ, "RAYON_NUM_THREADS": str(args.workers), "TOKENIZERS_PARALLELISM": "true"}
    raw = {r["name"]: r for r in run_py(RAW, str(TOKENIZER), *files, env=env)}
    tokens = raw["encode_batch"]["tokens"]
    rates = {name: tokens / r["seconds"] for name, r in raw.items()}

    hf = tmp / "hf-tokenizer"
    hf.mkdir()
    (hf / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    (hf / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPTNeoXTokenizerFast", "eos_token": "<|endoftext|>"})
    )
    foundry = run_py(FOUNDRY, str(plain), str(tmp / "foundry-out"), str(hf))[-1]
    rates["llm-foundry convert_dataset_json"] = tokens / foundry["seconds"]

    server, s3 = loopback_s3()
    from cpt.data.convert import convert

    for p in sorted(zst.iterdir()):
        s3.upload_file(str(p), "bench", f"raw/{p.name}")
    t = time.perf_counter()
    result = convert(
        ["s3://bench/raw/*.jsonl.zst"],
        "s3://bench/mds",
        "train",
        str(TOKENIZER),
        KEY,
        workers=args.workers,
        progress=False,
    )
    seconds = time.perf_counter() - t
    docs = sum(d.docs_written for d in result.manifest.domains.values())
    assert result.tokens - docs == tokens, (result.tokens - docs, tokens)
    rates["cpt convert (s3 zst -> s3 MDS)"] = tokens / seconds
    server.stop()

    print(f"\n{'pipeline':<38} {'tokens/s':>12} {'vs raw encode_batch':>20}")
    for name, rate in rates.items():
        print(f"{name:<38} {rate:>12,.0f} {rate / rates['encode_batch']:>19.2f}x")
    cpt_rate = rates["cpt convert (s3 zst -> s3 MDS)"]
    print(f"\ncpt / raw encode_batch = {cpt_rate / rates['encode_batch']:.2f}  (target >= 0.90)")
    print(f"cpt / llm-foundry      = {cpt_rate / rates['llm-foundry convert_dataset_json']:.2f}")

    print(f"\n{'input':>8} {'tokens':>12} {'seconds':>8} {'main peak MB':>13} {'worker peak MB':>15}")
    code = PEAK.format(tok=TOKENIZER, key=KEY, workers=args.workers)
    for copies in (1, 4, 16):
        r = run_py(code, *_copies(plain, copies), str(tmp / f"peak-{copies}"))[-1]
        print(f"{copies:>7}x {r['tokens']:>12,} {r['seconds']:>8.1f} {r['main_mb']:>13.0f} {r['worker_mb']:>15.0f}")
    huge_lines(tmp, max(2, args.workers))


def huge_lines(tmp: Path, workers: int) -> None:
    """Worker peak memory on a file of small documents plus one huge line (spawned workers: ``workers >= 2``)."""
    from cpt.data.file_task import MAX_DOC_BYTES

    code = PEAK.format(tok=TOKENIZER, key=KEY, workers=workers)
    small = "".join(
        json.dumps({"text": f"document {i} " + "some ordinary words " * 50, "meta": {"redpajama_set_name": "A"}}) + "\n"
        for i in range(2000)
    )
    print(f"\n{'file':<44} {'tokens':>12} {'seconds':>8} {'worker peak MB':>15}")
    for label, size in (("small docs only", 0), ("+ one line just under the limit", MAX_DOC_BYTES - 4096),
                        ("+ one 64 MB line (skipped: too_large)", 64 << 20)):  # fmt: skip
        path = tmp / f"huge-{size}.jsonl"
        words = "word " * max(0, (size - 64) // 5)
        line = json.dumps({"text": words, "meta": {"redpajama_set_name": "A"}}) + "\n" if size else ""
        path.write_text(small + line)
        r = run_py(code, str(path), str(tmp / f"huge-out-{size}"))[-1]
        print(f"{label:<44} {r['tokens']:>12,} {r['seconds']:>8.1f} {r['worker_mb']:>15.0f}")


class Sampler:
    """Polls, every 20 ms, the size of a folder and the peak RSS (VmHWM) of processes whose command line holds a
    marker: the peak local disk and worker memory of a conversion."""

    def __init__(self, folder: Path, marker: str):
        import threading

        self.folder, self.marker, self.disk, self.rss, self.stop = folder, marker, 0, 0, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop:
            size = 0
            for root, _, names in os.walk(self.folder):
                for n in names:
                    try:
                        size += os.path.getsize(os.path.join(root, n))
                    except OSError:
                        pass
            self.disk = max(self.disk, size)
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if self.marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                        status = Path(f"/proc/{pid}/status").read_text()
                        kb = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM")))
                        self.rss = max(self.rss, kb * 1024)
                except (OSError, StopIteration, ValueError):
                    pass
            time.sleep(0.02)

    def done(self) -> tuple[float, float]:
        self.stop = True
        self.thread.join()
        return self.disk / 1e6, self.rss / 1e6


def engines(copies: int, workers: int) -> None:
    if not SAMPLE.is_file():
        sys.exit(f"the real sample is missing: {SAMPLE}")
    import ray
    import zstandard

    tmp = Path(tempfile.mkdtemp(prefix="cpt-bench-"))
    cache = tmp / "cache"
    os.environ.update(
        CPT_CACHE=str(cache), AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1"
    )
    server, s3 = loopback_s3()
    data = zstandard.ZstdCompressor(level=3).compress(SAMPLE.read_bytes())
    for i in range(copies):
        s3.put_object(Bucket="bench", Key=f"raw/part-{i:03d}.jsonl.zst", Body=data)
    print(f"input: {copies} x {SAMPLE.name} as zst on S3, {workers} workers, {os.cpu_count()} cores")
    from cpt.data.convert import convert

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)  # a cluster that is already up
    rows = {}
    for engine, marker in (("local", "multiprocessing"), ("ray", "ray::")):
        sampler = Sampler(cache, marker)
        t = time.perf_counter()
        result = convert(
            ["s3://bench/raw/*.jsonl.zst"], f"s3://bench/mds-{engine}", "train", str(TOKENIZER), KEY,
            workers=workers, progress=False, engine=engine,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        disk, rss = sampler.done()
        rows[engine] = (result.tokens, seconds, disk, rss)
    ray.shutdown()
    same = all(
        s3.get_object(Bucket="bench", Key=f"mds-local/{k}")["Body"].read()
        == s3.get_object(Bucket="bench", Key=f"mds-ray/{k}")["Body"].read()
        for k in (o["Key"][len("mds-local/") :] for o in _objects(s3, "mds-local/"))
    )
    server.stop()
    print(f"\n{'engine':<8} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'peak disk MB':>13} {'worker peak MB':>15}")
    for engine, (tokens, seconds, disk, rss) in rows.items():
        print(f"{engine:<8} {tokens:>12,} {seconds:>8.1f} {tokens / seconds:>12,.0f} {disk:>13.1f} {rss:>15.0f}")
    overhead = rows["ray"][1] / rows["local"][1] - 1
    print(f"\nRay's overhead: {overhead:+.1%} (target <= +10%); outputs byte-identical: {same}")
    per_core = rows["local"][0] / rows["local"][1] / workers
    print(f"per-core rate: {per_core:,.0f} tokens/s (local engine, {workers} workers)")
    print("\nextrapolated from the per-core rate (32-core nodes, the whole corpus, S3 to S3):")
    print(f"{'corpus':<24} {'nodes':>6} {'wall hours':>11} {'node-hours':>11}")
    for corpus, tokens in (("the Pile (300B)", 300e9), ("SlimPajama (627B)", 627e9)):
        for nodes in (1, 8, 32):
            hours = tokens / (per_core * 32 * nodes) / 3600
            print(f"{corpus:<24} {nodes:>6} {hours:>11,.1f} {hours * nodes:>11,.0f}")


def _objects(s3, prefix: str):
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
        yield from page.get("Contents", [])


def _copies(plain: Path, copies: int) -> list[str]:
    folder = plain.parent / f"copies-{copies}"
    folder.mkdir(exist_ok=True)
    data = (plain / "part-000.jsonl").read_bytes()
    for i in range(copies):
        (folder / f"part-{i:03d}.jsonl").write_bytes(data)
    return [str(folder / "*.jsonl")]


if __name__ == "__main__":
    main()
