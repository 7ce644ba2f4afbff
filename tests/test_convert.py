"""Conversion: write through the loopback S3 server, read back, compare counts and content."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import prewarmed
import pytest

from cpt.data import manifest as mf
from cpt.data import synthetic
from cpt.data.convert import DOMAIN_KEYS, convert
from cpt.data.sources import InputError
from cpt.io import storage

ROOT = Path(__file__).resolve().parents[1]
SP_KEY = DOMAIN_KEYS["slimpajama"]
PILE_KEY = DOMAIN_KEYS["pile"]


def read_back(remote: str, local: Path) -> list[np.ndarray]:
    """Every sample of an MDS dataset, in order, through mosaicml-streaming itself."""
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=remote, local=str(local), shuffle=False, batch_size=1, num_canonical_nodes=1)
    out = [ds[i]["tokens"] for i in range(ds.num_samples)]
    del ds
    return out


def expected_streams(records: list[dict], hf_tokenizer, key: str) -> dict[str, list[int]]:
    """Token stream per domain, built independently with transformers' tokenizer class."""
    streams: dict[str, list[int]] = defaultdict(list)
    outer, inner = key.split(".")
    for rec in records:
        if rec["text"].strip():
            streams[rec[outer][inner]] += hf_tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [0]
    return streams


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "cpt" / "assets" / "tokenizer.json"))


def test_real_sample_through_s3(sample_jsonl, s3_bucket, tokenizer_path, hf_tokenizer, tmp_path):
    raw = s3_bucket + "/raw/slimpajama_sample.jsonl.zst"
    import zstandard

    storage.write_bytes(raw, zstandard.ZstdCompressor().compress(sample_jsonl.read_bytes()))
    records = [json.loads(line) for line in sample_jsonl.read_text(encoding="utf-8").splitlines()]
    seq_len = 512
    result = convert(
        [s3_bucket + "/raw/*.zst"],
        s3_bucket + "/sp",
        "val",
        tokenizer_path,
        SP_KEY,
        seq_len=seq_len,
        workers=2,
        size_limit=1 << 16,
        progress=False,
    )

    streams = expected_streams(records, hf_tokenizer, SP_KEY)
    counts = Counter(r["meta"]["redpajama_set_name"] for r in records)
    empties = Counter(r["meta"]["redpajama_set_name"] for r in records if not r["text"].strip())
    assert sum(len(s) for s in streams.values()) == result.tokens == 910_941 - 0  # README: about 910k tokens
    manifest = mf.read(s3_bucket + "/sp/val")
    assert manifest.fingerprint == result.manifest.fingerprint
    assert set(manifest.domains) == set(counts)
    for name, d in manifest.domains.items():
        assert d.docs_read == counts[name]
        assert d.docs_written == counts[name] - empties[name]
        assert d.docs_read == d.docs_written + sum(d.docs_skipped.values())
        assert d.tokens == len(streams[name])
        assert d.samples == len(streams[name]) // seq_len
        assert d.tail_tokens_dropped == len(streams[name]) % seq_len
        samples = read_back(f"{s3_bucket}/sp/val/{d.slug}", tmp_path / d.slug)
        assert len(samples) == d.samples
        got = np.concatenate(samples)
        assert got.dtype == np.uint16 and all(len(s) == seq_len for s in samples)
        assert np.array_equal(got, np.asarray(streams[name][: d.samples * seq_len], dtype=np.uint16))
    # the merged index streams the whole split as one dataset
    merged = read_back(f"{s3_bucket}/sp/val", tmp_path / "merged")
    assert len(merged) == sum(d.samples for d in manifest.domains.values())
    assert manifest.inputs == [{"path": raw, "bytes": storage.size(raw)}]


def test_eos_placement_and_decoded_text(tmp_path, tokenizer_path, tokenizer):
    src = tmp_path / "in.jsonl"
    records = synthetic.write_jsonl(src, {"Wikipedia (en)": "prose"}, docs=12, seed=1, domain_key=PILE_KEY)
    records.insert(3, {"text": "Crème brûlée — naïve café", "meta": {"pile_set_name": "Wikipedia (en)"}})
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = convert(
        [str(src)], str(tmp_path / "out"), "train", tokenizer_path, PILE_KEY, seq_len=64, workers=1, progress=False
    )
    d = result.manifest.domains["Wikipedia (en)"]
    assert d.slug == "wikipedia-en"
    tokens = np.concatenate(read_back(str(tmp_path / "out" / "train" / "wikipedia-en"), tmp_path / "cache"))
    eos = np.flatnonzero(tokens == 0)
    lengths = [len(tokenizer.encode(r["text"], add_special_tokens=False).ids) for r in records]
    assert list(eos) == list(np.cumsum([n + 1 for n in lengths]) - 1)[: len(eos)]
    docs = np.split(tokens, eos + 1)[: len(eos)]
    for rec, doc in zip(records, docs):
        assert doc[-1] == 0
        assert tokenizer.decode(doc[:-1].tolist()) == unicodedata.normalize("NFC", rec["text"])


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _many_files(folder: Path, n: int, docs: int = 40, words=(50, 400)) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        records += synthetic.write_jsonl(
            folder / f"part-{i:02d}.jsonl",
            {"Pile-CC": "prose", "Github": "code", "ArXiv": "science"},
            docs=docs,
            seed=i,
            domain_key=PILE_KEY,
            words=words,
        )
    return records


def test_one_and_two_workers_identical(tmp_path, tokenizer_path):
    _many_files(tmp_path / "in", 5)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        convert(
            [str(tmp_path / "in" / "*.jsonl")],
            str(out),
            "train",
            tokenizer_path,
            PILE_KEY,
            seq_len=128,
            workers=workers,
            size_limit=1 << 14,
            progress=False,
        )
        outs.append(_tree_digest(out))
    assert len([k for k in outs[0] if k.endswith(".mds")]) > 5  # several shards per domain
    assert outs[0] == outs[1]


def test_compressed_inputs_match_plain(tmp_path, tokenizer_path):
    records = _many_files(tmp_path / "plain", 1)
    data = (tmp_path / "plain" / "part-00.jsonl").read_bytes()
    import zstandard

    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.jsonl.gz").write_bytes(gzip.compress(data))
    prints = []
    for name in ("plain", "z", "g"):
        res = convert(
            [str(tmp_path / name / "*")],
            str(tmp_path / f"out-{name}"),
            "val",
            tokenizer_path,
            PILE_KEY,
            seq_len=64,
            workers=1,
            progress=False,
        )
        prints.append(res.manifest.fingerprint)
        assert sum(d.docs_read for d in res.manifest.domains.values()) == len(records)
    assert len(set(prints)) == 1


def test_killed_conversion_resumes_identically(tmp_path, tokenizer_path):
    _many_files(tmp_path / "in", 8, docs=300)
    cmd = [
        sys.executable,
        str(ROOT / "convert" / "pile.py"),
        "--input",
        str(tmp_path / "in" / "*.jsonl"),
        "--split",
        "train",
        "--tokenizer",
        tokenizer_path,
        "--seq-len",
        "128",
        "--workers",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "CPT_CACHE": str(tmp_path / "cache-a")}
    code, log = prewarmed.run([*cmd[1:], "--output", str(tmp_path / "ref")], str(tmp_path), env)
    assert code == 0, log[-3000:]

    env["CPT_CACHE"] = str(tmp_path / "cache-b")
    proc = prewarmed.shared().launch([*cmd[1:], "--output", str(tmp_path / "killed")], str(tmp_path), env)
    deadline = time.time() + 120
    markers = tmp_path / "killed" / "train" / ".convert"  # a finished file's marker, next to its output
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, 9)
    proc.wait()
    done = len(list(markers.glob("*.json")))
    assert 2 <= done < 8, f"the kill should land mid-way, {done} of 8 files were done"
    code, log = prewarmed.run([*cmd[1:], "--output", str(tmp_path / "killed")], str(tmp_path), env)
    assert code == 0 and f"{done} of 8 files reused" in log, log[-3000:]
    assert _tree_digest(tmp_path / "ref") == _tree_digest(tmp_path / "killed")
    assert not markers.exists() or not any(markers.iterdir())  # a complete split keeps no markers


BAD_LINES = [
    ("malformed_json", b'{"text": "a", "meta": {"pile_set_name": "X"}', "malformed JSON"),
    ("missing_text", b'{"meta": {"pile_set_name": "X"}}', "missing key 'text'"),
    ("non_string_text", b'{"text": 3, "meta": {"pile_set_name": "X"}}', "'text' is int"),
    ("missing_domain", b'{"text": "abc", "meta": {}}', "domain key 'meta.pile_set_name'"),
    ("invalid_utf8", b'{"text": "caf\xe9", "meta": {"pile_set_name": "X"}}', "not UTF-8"),
]


@pytest.mark.parametrize("reason,line,message", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_names_file_and_line(tmp_path, tokenizer_path, reason, line, message):
    good = b'{"text": "hello there", "meta": {"pile_set_name": "X"}}\n'
    src = tmp_path / "bad.jsonl"
    src.write_bytes(good * 3 + line + b"\n" + good)
    with pytest.raises(InputError, match=f"bad.jsonl:4: .*{message}") as info:
        convert(
            [str(src)], str(tmp_path / "out"), "train", tokenizer_path, PILE_KEY, seq_len=8, workers=1, progress=False
        )
    assert info.value.line == 4 and info.value.reason == reason
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()

    res = convert(
        [str(src)],
        str(tmp_path / "out"),
        "train",
        tokenizer_path,
        PILE_KEY,
        seq_len=8,
        workers=1,
        skip_bad_lines=True,
        progress=False,
    )
    m = res.manifest
    attributed = sum(sum(d.docs_skipped.values()) for d in m.domains.values())
    assert attributed + sum(m.unattributed_skipped.values()) == 1
    skipped = m.domains["X"].docs_skipped if reason in ("missing_text", "non_string_text") else m.unattributed_skipped
    assert skipped == {reason: 1}
    x = m.domains["X"]
    assert x.docs_written == 4 and x.docs_read == x.docs_written + sum(x.docs_skipped.values())


def test_empty_documents_counted_not_written(tmp_path, tokenizer_path):
    src = tmp_path / "e.jsonl"
    src.write_text(
        '{"text": "", "meta": {"pile_set_name": "X"}}\n{"text": "  \\n", "meta": {"pile_set_name": "X"}}\n'
        '{"text": "Hello world", "meta": {"pile_set_name": "X"}}\n\n'
    )
    res = convert(
        [str(src)], str(tmp_path / "out"), "train", tokenizer_path, PILE_KEY, seq_len=2, workers=1, progress=False
    )
    x = res.manifest.domains["X"]
    assert (x.docs_read, x.docs_written, x.docs_skipped) == (3, 1, {"empty": 2})
    assert (x.tokens, x.samples, x.tail_tokens_dropped) == (3, 1, 1)  # [12092, 1533, 0]
    assert res.manifest.unattributed_skipped == {"blank_line": 1}


def test_missing_and_unreadable_inputs(tmp_path, tokenizer_path):
    with pytest.raises(storage.StorageError, match="nope.*matches no file"):
        convert([str(tmp_path / "nope.jsonl")], str(tmp_path / "o"), "train", tokenizer_path, PILE_KEY)
    bad = tmp_path / "broken.jsonl.zst"
    bad.write_bytes(b"this is not zstd at all")
    with pytest.raises(InputError, match="broken.jsonl.zst:1: corrupt zstd"):
        convert([str(bad)], str(tmp_path / "o"), "train", tokenizer_path, PILE_KEY, workers=1, progress=False)
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(InputError, match="notes.txt: unsupported input format"):
        convert([str(txt)], str(tmp_path / "o"), "train", tokenizer_path, PILE_KEY)


def test_unwritable_output_and_unreachable_bucket(tmp_path, tokenizer_path, s3_server):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hi", "meta": {"pile_set_name": "X"}}\n')
    (tmp_path / "file").write_text("")
    with pytest.raises(storage.StorageError, match="not writable"):
        convert([str(src)], str(tmp_path / "file" / "out"), "train", tokenizer_path, PILE_KEY)
    t0 = time.perf_counter()
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket/out/train is not writable"):
        convert([str(src)], "s3://no-such-bucket/out", "train", tokenizer_path, PILE_KEY)
    assert time.perf_counter() - t0 < 10


def test_cli_help_names_every_flag():
    out = subprocess.run(
        [sys.executable, str(ROOT / "convert" / "slimpajama.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--input", "--output", "--split", "--tokenizer", "--seq-len", "--workers", "--skip-bad-lines"):
        assert flag in out
    assert "meta.redpajama_set_name" in out


def test_cli_error_exit(tmp_path, tokenizer_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hi"}\n')
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "convert" / "pile.py"),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o"),
            "--split",
            "val",
            "--tokenizer",
            tokenizer_path,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"{src}:1: missing or non-string domain key 'meta.pile_set_name'" in proc.stderr
