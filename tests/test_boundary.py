"""The trust boundary (``cpt.io.untrusted``): what a bucket or a run's own records hold is input someone else may
have written. One table per class of the audit, through the entry points that read that kind of file: nothing
runs, nothing is written outside its folder, no secret is shown or stored, every refusal is one clear error.

The trained-checkpoint cases (export and average into an existing OUT, averaging a folder into itself, a
fingerprint refused before the lock) are in ``test_stages.py``, beside its trained trunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import zstandard
from conftest import load_tiny

from cpt import config
from cpt.cli import main
from cpt.io import redact, safe_load, storage, untrusted
from cpt.run.checkpoints import MARKER
from cpt.run.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yamls" / "tiny-cpu.yaml")


def _s(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def dotted_payload(marker: Path) -> bytes:
    """Protocol 4: STACK_GLOBAL of an allowed module and the dotted name ``os.system``, then a call."""
    return b"\x80\x04" + _s("torch.distributed.checkpoint.metadata") + _s("os.system") + b"\x93" + _s(
        f"touch {marker}"
    ) + b"\x85R."  # fmt: skip


def mark(folder: Path) -> None:
    """A completion marker computed here: every file's size and sha256."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in folder.iterdir()
        if p.name != MARKER and p.is_file()
    }
    (folder / MARKER).write_text(json.dumps({"world_size": 1, "files": files}))


def sharded(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(4), "note": {"step": 4}}, checkpoint_id=str(folder))
    mark(folder)
    return folder


# ---- 1. a sharded checkpoint's .metadata never runs code, through every entry point -----------------------------


def test_a_dotted_global_in_metadata_is_a_real_payload_and_every_entry_point_refuses_it(tiny, tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(dotted_payload(proof))  # the unrestricted unpickler runs it: the payload is real
    assert proof.exists()

    marker = tmp_path / "ran"
    save = tmp_path / "save"
    ck = sharded(save / "ep0-ba4")
    (ck / ".metadata").write_bytes(dotted_payload(marker))
    mark(ck)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"os\.system.*not allowed"):
        safe_load.check(str(ck))
    assert main(["export", str(ck), str(tmp_path / "hf")]) == 2
    assert main(["average", str(save), str(tmp_path / "avg"), "--last", "1"]) == 2
    with pytest.raises(config.ConfigError, match=r"\.metadata: refusing"):  # a plain relaunch
        Plan.from_config(load_tiny(tiny, f"variables.save_folder={save}"), TINY)
    with pytest.raises(config.ConfigError, match=r"cpt.init.from: .*\.metadata: refusing"):
        Plan.from_config(load_tiny(tiny, f"variables.save_folder={tmp_path / 'new'}", f"cpt.init.from={ck}"), TINY)
    assert not marker.exists() and not (tmp_path / "hf").exists() and not (tmp_path / "avg").exists()


def _edit_metadata(folder: Path, **change) -> None:
    with open(folder / ".metadata", "rb") as fh:
        md = pickle.load(fh)  # the test's own checkpoint: trusted here
    for info in md.storage_data.values():
        for k, v in change.items():
            object.__setattr__(info, k, v(info) if callable(v) else v)
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump(md, fh)


@pytest.mark.parametrize(
    "case, change, why",
    [
        ("outside", {"relative_path": "../outside.distcp"}, "is not a file of this checkpoint folder"),
        ("absolute", {"relative_path": "/dev/zero"}, "is not a file of this checkpoint folder"),
        ("fifo", {"relative_path": "fifo"}, "not a regular file"),
        ("past-the-end", {"offset": lambda i: i.offset + 10**9}, "lie outside"),
        ("negative", {"length": -1}, "non-negative integers"),
    ],
)
def test_metadata_items_must_be_direct_child_files_within_their_size(case, change, why, tmp_path):
    ck = sharded(tmp_path / "save" / "ep0-ba4")
    (tmp_path / "save" / "outside.distcp").write_bytes(b"x" * 100)
    os.mkfifo(ck / "fifo")
    _edit_metadata(ck, **change)
    mark(ck)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=why):
        safe_load.check(str(ck))
    assert main(["export", str(ck), str(tmp_path / "hf")]) == 2  # one clear line, no hang on the FIFO


# ---- 2. checkpoints that would exhaust memory or crash ---------------------------------------------------------


class _Calls:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize(
    "name, value, why",
    [
        ("stride-0", torch.zeros(1).expand(1 << 28), r"claims 1,073,741,824 bytes .* over a storage of 4"),
        ("timedelta", _Calls(__import__("datetime").timedelta, 10**10), "cannot read this checkpoint: OverflowError"),
        ("dtype", _Calls(__import__("numpy").dtype, "not-a-dtype"), "cannot read this checkpoint: TypeError"),
    ],
)
def test_checkpoints_that_would_exhaust_memory_or_raise_are_refused_in_one_line(name, value, why, tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    path = save / "ep0-ba4-rank0.pt"
    torch.save({"state": {"model": {"w": value}, "integrations": {}}}, path)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(safe_load.UnsafeCheckpointError, match=why):
        safe_load.load(str(path))
    assert main(["average", str(save), str(tmp_path / "avg"), "--last", "1"]) == 2
    assert main(["export", str(path), str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "avg").exists() and not (tmp_path / "hf").exists()


def test_planted_checkpoint_names_cost_a_bounded_number_of_downloads(tmp_path, s3_bucket):
    from cpt.run.checkpoints import MAX_BROKEN, find_resume

    folder = f"{s3_bucket}/runs/planted"
    for b in range(1, 41):
        storage.write_bytes(f"{folder}/ep0-ba{b}-rank0.pt", b"x")  # 1 byte: refused by its size, never fetched
    for b in range(41, 41 + MAX_BROKEN + 5):
        storage.write_bytes(f"{folder}/ep0-ba{b}-rank0.pt", b"y" * 64)  # fetched, fails its CRC, removed
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"the {MAX_BROKEN} newest checkpoints are all broken"):
        find_resume(folder, str(cache))
    left = [p for p in cache.rglob("*") if p.is_file() and p.name != ".lock"]
    assert left == []


# ---- 3. indices: every basename stays inside its split -------------------------------------------------------


@pytest.mark.parametrize("which", ["merged", "domain"])
@pytest.mark.parametrize("basename", ["../../escaped.mds", "/tmp/escaped.mds", "a//b.mds", "./x.mds"])
def test_an_index_basename_that_leaves_its_split_is_refused_by_every_reader(which, basename, tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    split = data / "upstream" / "val"
    slug = next(p.name for p in split.iterdir() if p.is_dir())
    index_path = split / "index.json" if which == "merged" else split / slug / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["raw_data"]["basename"] = basename
    index_path.write_text(json.dumps(index))
    with pytest.raises(config.ConfigError, match=r"index.json: shards\[0\].raw_data.basename: refusing the key"):
        Plan.from_config(load_tiny(tiny, f"variables.data={data}"), TINY)
    if which == "merged":
        assert main(["verify", str(split)]) == 2
    assert not list(tmp_path.rglob("escaped.mds")) and not os.path.exists("/tmp/escaped.mds")


# ---- 4. the cache never writes through a link; task keys are files ------------------------------------------


def test_the_task_cache_replaces_a_planted_symlink_and_keeps_records_apart(tmp_path, s3_bucket):
    from cpt.io.cache import cache_dir, mirror_file

    victim = tmp_path / "victim"
    victim.write_text("untouched")
    for name in ("t.jsonl", "record.json", "etag.json"):
        url = f"{s3_bucket}/tasks/{name}"
        storage.write_bytes(url, b'{"context": "a", "continuation": "b"}\n')
        home = Path(cache_dir("tasks", hashlib.sha256(url.encode()).hexdigest()[:16]))
        (home / "record.json").symlink_to(victim)
        local = mirror_file(url, "tasks")
        assert Path(local).read_bytes() == b'{"context": "a", "continuation": "b"}\n'
        assert not (home / "record.json").is_symlink() and victim.read_text() == "untouched"
        assert mirror_file(url, "tasks") == local  # the record is read back: the copy is reused
    for bad in (f"{s3_bucket}/tasks/..", f"{s3_bucket}/tasks/."):
        with pytest.raises(untrusted.UntrustedError, match="refusing the key"):
            mirror_file(bad, "tasks")


def test_a_replaced_tokenizer_on_s3_is_fetched_again(tmp_path, s3_bucket, tokenizer_path):
    from cpt.data import tokenizer

    url = f"{s3_bucket}/tok/tokenizer.json"
    original = Path(tokenizer_path).read_bytes()
    storage.write_bytes(url, original)
    assert tokenizer.describe(url).sha256 == hashlib.sha256(original).hexdigest()
    changed = original + b"\n"
    storage.write_bytes(url, changed)
    assert tokenizer.describe(url).sha256 == hashlib.sha256(changed).hexdigest()


# ---- 5. secrets ------------------------------------------------------------------------------------------------


SECRET_KEYS = [
    "hf_token", "token", "wandb_token", "github_token", "api_token", "mlflow_tracking_token", "passphrase",
    "aws_secret_access_key", "api_key", "db_password", "credentials", "auth_header", "my_signature",
]  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_every_common_secret_key_family_is_masked(key):
    shown = redact.config({"loggers": {"x": {key: "s3cr3t-value"}}, "variables": {key: "s3cr3t-value"}})
    assert "s3cr3t" not in json.dumps(shown)


def test_what_is_not_a_secret_stays_readable():
    plain = {"tokens_per_domain": 2048, "pad_token": "<|padding|>", "tokenizer_name": "pythia", "domain_key": "x"}
    assert redact.config(plain) == plain


@pytest.mark.parametrize(
    "url, hidden",
    [
        ("https://alice:p@ss@word@host/x", ["alice", "p@ss", "word@"]),
        ("https://:only-password@host/x", ["only-password"]),
        ("https://host/x?access_token=abc123&page=2", ["abc123"]),
        ("s3://b/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA", ["deadbeef", "AKIA"]),
        ("mlflow at http://u:pw@127.0.0.1:5000 failed", ["u:pw"]),
    ],
)
def test_url_credentials_are_masked_whole(url, hidden):
    shown = redact.text(url)
    assert all(h not in shown for h in hidden), shown
    assert "***" in shown


def test_the_command_line_loggers_see_has_every_secret_override_masked():
    """W&B records ``sys.argv`` (``wandb-metadata.json``'s ``args``); cpt.train masks it first."""
    argv = [
        "train", "y.yaml", "variables.hf_token=abc", "variables.run_name=r1", "max_duration=8ba",
        "variables.model=hf_abcdefghijklmnopqrstuvwx", "variables.bucket=s3://u:pw@host/b", "tokenizer_name=x",
        "loggers={wandb: {api_key: k-1}}", "loggers={tensorboard: {log_dir: tb}}",
    ]  # fmt: skip
    assert redact.overrides(argv) == [
        "train", "y.yaml", "variables.hf_token=***", "variables.run_name=r1", "max_duration=8ba",
        "variables.model=***", "variables.bucket=***", "tokenizer_name=x", "loggers=***",
        "loggers={tensorboard: {log_dir: tb}}",
    ]  # fmt: skip


def test_a_secret_override_is_never_recorded_in_the_bucket(tiny, tmp_path):
    from cpt.run import record

    folder = tmp_path / "save"
    overrides = ["variables.hf_token=hf_abcdefghijklmnopqrstuvwxyz", "optimizer.lr=1e-3", "x.url=https://u:p@h/"]
    record.write_run_spec(str(folder), TINY, overrides, "tiny-cpu")
    text = (folder / record.RUN_SPEC).read_text()
    assert "hf_abcdefghij" not in text and "u:p@" not in text
    assert json.loads(text)["overrides"] == ["optimizer.lr=1e-3"]


def test_a_config_error_names_the_interpolation_not_its_resolved_secret(tiny, monkeypatch):
    monkeypatch.setenv("CPT_TEST_SECRET", "SuperSecretKey123")
    for overrides, named in (
        (["optimizer.weight_decay=${oc.env:CPT_TEST_SECRET}"], "${oc.env:CPT_TEST_SECRET}"),
        (["run_name=bad/${oc.env:CPT_TEST_SECRET}"], "${oc.env:CPT_TEST_SECRET}"),
        (["variables.db_password=SuperSecretKey123", "optimizer.eps=${variables.db_password}"], "${variables.db_"),
    ):
        with pytest.raises(config.ConfigError) as info:
            config.check(config.load(TINY, overrides), TINY)
        assert "SuperSecretKey123" not in str(info.value) and named in str(info.value)
    with pytest.raises(config.ConfigError, match="run_name='a/b' must be a plain name"):  # a plain reference: shown
        config.check(config.load(TINY, ["variables.run_name=a/b"]), TINY)


# ---- 6. records: a launch's record, the lock, metrics ---------------------------------------------------------


def _record(folder: Path, tiny: Path, yaml: str | None = None, overrides: list[str] | None = None, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ep0-ba4-rank0.pt").write_bytes(b"")  # a name in the listing; never read to plan a branch
    base = [f"variables.data={tiny / 'data'}", f"variables.model={tiny / 'model'}", f"variables.save_folder={folder}"]
    spec = {"yaml": yaml if yaml is not None else Path(TINY).read_text(), "overrides": base + (overrides or [])}
    (folder / "cpt-run.json").write_text(json.dumps({**spec, **extra}))


PLANTED = [
    ("remote code", {"overrides": ["cpt.trust_remote_code=true"]}, "cpt.trust_remote_code: true"),
    ("fingerprint", {"overrides": ["cpt.allow_fingerprint_change=true"]}, "allow_fingerprint_change"),
    ("code_paths override", {"overrides": ["code_paths=[/tmp/x.py]"]}, "code_paths"),
    ("code_paths yaml", {"yaml": Path(TINY).read_text() + "\ncode_paths: [/tmp/x.py]\n"}, "code_paths"),
    ("env resolver", {"overrides": ["run_name=${oc.env:HOME}"]}, r"resolver \$\{oc.env:...\}"),
    ("decode resolver", {"yaml": Path(TINY).read_text() + "\nseed: ${oc.decode:'17'}\n"}, "oc.decode"),
]


@pytest.mark.parametrize("case, planted, why", PLANTED, ids=[p[0] for p in PLANTED])
def test_a_planted_run_record_never_grants_anything_to_cpt_anneal(case, planted, why, tiny, tmp_path, capsys):
    trunk = tmp_path / "runs" / "tiny-cpu"
    _record(trunk, tiny, planted.get("yaml"), planted.get("overrides"))
    out = tmp_path / "branches"
    assert main(["anneal", str(trunk), "--at", "4", "--length", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(why, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    "content", ["not json", "[1, 2]", '{"overrides": []}', '{"yaml": "a: [", "overrides": []}', '{"yaml": 3}']
)
def test_a_malformed_run_record_is_one_clear_error(content, tmp_path, capsys):
    trunk = tmp_path / "trunk"
    trunk.mkdir()
    (trunk / "cpt-run.json").write_text(content)
    assert main(["anneal", str(trunk), "--at", "4", "--length", "2", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "cpt-run.json" in err and "Traceback" not in err


def test_a_branch_folder_derives_from_the_folder_given_never_from_the_record(tiny, tmp_path):
    from cpt.tools.anneal import plan_branch

    trunk = tmp_path / "runs" / "tiny-cpu"
    victim = tmp_path / "runs" / "victim-ck"
    _record(trunk, tiny, overrides=[f"variables.save_folder={trunk}/../victim-ck"])
    branch = plan_branch(str(trunk) + "/./", "4", "2ba", out=str(tmp_path / "b"))
    assert branch.save_folder == str(tmp_path / "runs" / "tiny-cpu-anneal4-linear-2ba")
    assert not untrusted.inside(branch.save_folder, str(victim)) and not victim.exists()
    copy = tmp_path / "copy" / "tiny-cpu"  # a copied trunk: its branches land beside the copy
    shutil.copytree(trunk, copy)
    assert plan_branch(str(copy), "4", "2ba", out=str(tmp_path / "b2")).save_folder.startswith(str(tmp_path / "copy"))


def test_another_run_never_takes_over_a_save_folder_and_a_refusal_writes_nothing(tiny, tmp_path, capsys):
    from cpt.train import main as train_main

    folder = tmp_path / "save"
    _record(folder, tiny, run_name="owner-run")
    (folder / "ep0-ba4-rank0.pt").unlink()
    before = (folder / "cpt-run.json").read_bytes()
    args = [f"variables.{k}={v}" for k, v in (("data", tiny / "data"), ("model", tiny / "model"))]
    code = train_main([TINY, *args, f"variables.save_folder={folder}", f"cpt.run_dir={tmp_path / 'runs'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "belongs to the run 'owner-run'" in err and "save_folder of its own" in err
    assert (folder / "cpt-run.json").read_bytes() == before and not (folder / ".cpt-lock.json").exists()


def test_a_fingerprint_refusal_comes_before_the_lock_and_the_record(tiny, tmp_path, capsys):
    from cpt.train import main as train_main

    folder = tmp_path / "save"
    folder.mkdir()
    torch.save({"state": {"callbacks": {"FingerprintGuard": {"fingerprint": "0" * 64}}}}, folder / "ep0-ba4-rank0.pt")
    args = [f"variables.data={tiny / 'data'}", f"variables.model={tiny / 'model'}", f"variables.save_folder={folder}"]
    assert train_main([TINY, *args, f"cpt.run_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "fingerprint 000000000000" in err and "allow_fingerprint_change" in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["ep0-ba4-rank0.pt"]


def test_a_fresh_lock_of_another_host_with_our_pid_is_not_taken_over(tmp_path):
    from cpt.run import lock

    folder = tmp_path / "save"
    folder.mkdir()
    held = {"host": socket.gethostname() + "-other", "pid": os.getpid(), "heartbeat": time.time()}
    (folder / lock.LOCK).write_text(json.dumps(held))
    with pytest.raises(lock.RunLockError, match="in use by a live run"):
        lock.acquire(str(folder))
    for junk in ("[1]", "not json", '{"heartbeat": "soon"}', '{"heartbeat": 1e999}'):
        (folder / lock.LOCK).write_text(junk)  # a malformed lock is a dead one: taken over, no traceback
        lock.acquire(str(folder))
        assert json.loads((folder / lock.LOCK).read_text())["pid"] == os.getpid()
        lock.release(str(folder))


def test_a_resume_on_another_node_continues_the_buckets_metrics(tmp_path, s3_bucket):
    from cpt.run.metrics_log import MetricsJSONL

    remote = f"{s3_bucket}/runs/r"
    rows = [{"batch": b, "tokens": 4 * b, "loss": 1.0 / (b + 1)} for b in range(9)]
    storage.write_bytes(f"{remote}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    local = tmp_path / "other-node" / "metrics.jsonl"
    MetricsJSONL(str(local), remote).init(None, None)
    assert [json.loads(line) for line in local.read_text().splitlines()] == rows


@pytest.mark.parametrize(
    "row, why",
    [('{"batch": "x"}', "'batch' must be a non-negative integer"), ("[1]", "expected a JSON dict"),
     ('{"batch": 1, "loss": "high"}', "'loss' must be a number or null"), ("{bad", "not valid JSON")],
)  # fmt: skip
def test_cpt_report_names_the_line_of_a_malformed_metrics_row(row, why, tmp_path):
    from cpt.tools import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"batch": 0, "loss": 1.0}\n' + row + "\n" + '{"batch": 2, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=f"metrics.jsonl:2: .*{why}"):
        report.load(str(run))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2


def test_the_vocabulary_check_covers_a_train_source_named_like_an_eval_dataset(tiny, tmp_path):
    from cpt.data import manifest

    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    split = str(data / "upstream" / "train")  # tiny-cpu.yaml: cpt.train.upstream and cpt.eval.datasets.upstream
    m = manifest.read(split)
    manifest.write(split, manifest.Manifest(**{**m.__dict__, "vocab_size": 10**6}))
    with pytest.raises(config.ConfigError, match="cpt.train.upstream has token ids up to 1000000"):
        Plan.from_config(load_tiny(tiny, f"variables.data={data}"), TINY)


# ---- 7. inputs that would exhaust memory or file handles ----------------------------------------------------


def test_a_huge_task_line_is_refused_naming_it_without_reading_it_whole(tmp_path):
    from cpt.eval.tasks import check_file

    path = tmp_path / "t.jsonl"
    with open(path, "w") as fh:
        fh.write('{"context": "a", "continuation": "b"}\n' * 3)
        fh.write('{"context": "' + "x" * (untrusted.LINE_BYTES + 10) + '", "continuation": "b"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:4: a line of more than 16,777,216 bytes"):
        check_file(str(path), "language_modeling")


def test_a_decompression_bomb_is_read_in_bounded_pieces(tmp_path, tokenizer_path):
    from cpt.data.convert import DOMAIN_KEYS, convert

    key = DOMAIN_KEYS["pile"]
    good = json.dumps({"text": "a small document", "meta": {key.split(".")[1]: "Pile-CC"}}) + "\n"
    path = tmp_path / "bomb.jsonl.zst"
    bomb = b'{"text": "' + b"a" * (64 << 20) + b'"}\n'  # one 64 MiB line among small ones, 1000x compressed
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(good.encode() * 3 + bomb + good.encode()))
    assert path.stat().st_size < 1 << 20
    result = convert([str(path)], str(tmp_path / "out"), "train", tokenizer_path, key, seq_len=8, workers=1,
                     progress=False, skip_bad_lines=True)  # fmt: skip
    assert result.manifest.unattributed_skipped == {"too_large": 1}
    assert result.manifest.domains["Pile-CC"].docs_read == 4


def test_too_many_domains_stop_the_run_naming_the_line(tmp_path, tokenizer_path):
    from cpt.data.convert import DOMAIN_KEYS, convert
    from cpt.data.file_task import MAX_DOMAINS
    from cpt.data.sources import InputError

    key = DOMAIN_KEYS["pile"]
    path = tmp_path / "many.jsonl"
    rows = (json.dumps({"text": "doc", "meta": {key.split(".")[1]: f"d{i}"}}) + "\n" for i in range(MAX_DOMAINS + 3))
    path.write_text("".join(rows))
    with pytest.raises(InputError, match=f"many.jsonl:{MAX_DOMAINS + 1}: .*one more than {MAX_DOMAINS}"):
        convert([str(path)], str(tmp_path / "out"), "train", tokenizer_path, key, seq_len=8, workers=1, progress=False)


# ---- 8. random damage to every kind of record: a clean refusal or the right answer -----------------------------


def _damage(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0 and data:
        return data[: rng.randrange(len(data))]  # truncated
    if kind == 1 and data:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]  # one byte changed
    if kind == 2:
        i = rng.randrange(len(data) + 1)
        return data[:i] + rng.choice([b"..", b"/", b"\x00", b'"', b"}", b"null", b"-1", b"1e999"]) + data[i:]
    if kind == 3:
        return json.dumps(rng.choice([None, [], {}, 1, "x", {"files": []}, {"shards": None}])).encode()
    return data.replace(b'"', b"'", 1)


def test_random_damage_to_every_record_is_a_clean_refusal_or_the_right_answer(tiny, tmp_path):
    from cpt.data import manifest
    from cpt.run.checkpoints import find_resume
    from cpt.tools import report
    from cpt.tools.anneal import recorded_launch

    rng = random.Random(20)
    trunk = tmp_path / "trunk"
    _record(trunk, tiny)
    ck = sharded(tmp_path / "sharded" / "ep0-ba4")
    split = tmp_path / "split"
    shutil.copytree(tiny / "data" / "upstream" / "val", split)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"batch": b, "loss": 1.0}) + "\n" for b in range(5)))
    readers = {  # the record, and the reader that reads it back
        trunk / "cpt-run.json": lambda: recorded_launch(str(trunk)),
        ck / MARKER: lambda: find_resume(str(ck.parent), str(tmp_path / "cache")),
        ck / ".metadata": lambda: safe_load.check(str(ck)),
        split / "manifest.json": lambda: manifest.read(str(split)),
        split / "index.json": lambda: untrusted.read_index(str(split)),
        run / "metrics.jsonl": lambda: report.load(str(run)),
    }
    outcomes = {"refused": 0, "read": 0}
    for path, read in readers.items():
        original = path.read_bytes()
        for _ in range(25):
            path.write_bytes(_damage(original, rng))
            try:
                read()
                outcomes["read"] += 1
            except (ValueError, storage.StorageError) as exc:  # ConfigError, UntrustedError, ManifestError ...
                assert str(exc) and "\n" not in str(exc).strip()[:400], exc
                outcomes["refused"] += 1
        path.write_bytes(original)
        read()  # the undamaged record still reads
    assert outcomes["refused"] > 50 and sum(outcomes.values()) == 150


def test_pickled_weights_in_a_model_folder_are_refused_before_transformers_or_lm_eval_see_them(tiny, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny / "model", folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"gpt_neox.embed_in.weight": _Calls(os.system, f"touch {marker}")}, folder / "pytorch_model.bin")
    with pytest.raises(config.ConfigError, match=r"pytorch_model.bin: .*refusing to load.*posix.system"):
        Plan.from_config(load_tiny(tiny, f"variables.model={folder}"), TINY)
    task = tmp_path / "t.jsonl"
    task.write_text('{"context": "a b", "continuation": " c"}\n' * 2)
    (tmp_path / "tasks.yaml").write_text(f"tasks: {{t: {{path: '{task}', kind: language_modeling}}}}\n")
    assert main(["eval", str(folder), str(tmp_path / "tasks.yaml"), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "Traceback" not in err and not marker.exists()


@pytest.mark.parametrize(
    "marker",
    [
        b"not json",
        b"[1, 2]",
        b'{"domains": {"A": {"slug": "a", "docs_read": "9"}}}',
        b'{"domains": {"A": {"slug": "a", "tokens": -1}}}',
        b'{"domains": {"A": {"slug": "a", "docs_skipped": {"x": 1.5}}}}',
        b'{"domains": {"A": {"slug": "a"}}, "tails": {"A": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}',
        b'{"domains": {}, "tails": [1]}',
        b'{"unattributed_skipped": {"blank_line": true}}',
        b'{"domains": {}, "code": "os.system"}',
    ],
)
def test_a_planted_or_damaged_conversion_marker_is_refused_naming_it(tmp_path, marker):
    """A finished task's marker is read back from the destination: anything but counts and short tails is refused,
    naming the marker, and never reaches the manifest."""
    from cpt.data import file_task

    task = file_task.FileTask(0, "in.jsonl", "k", str(tmp_path / "train"), "", "meta.x", False, 16, "64mb", None)
    Path(task.marker).parent.mkdir(parents=True)
    Path(task.marker).write_bytes(marker)
    with pytest.raises(untrusted.UntrustedError, match=re.escape(task.marker)):
        file_task.read_marker(task)


def test_a_good_conversion_marker_reads_back(tmp_path):
    from cpt.data import file_task

    task = file_task.FileTask(0, "in.jsonl", "k", str(tmp_path / "train"), "", "meta.x", False, 16, "64mb", None)
    Path(task.marker).parent.mkdir(parents=True)
    good = {"domains": {"A": {"slug": "a", "docs_read": 2, "docs_written": 2, "tokens": 21, "samples": 1}},
            "tails": {"A": "BQAAAA=="}, "first_lines": {"A": 1}}  # fmt: skip
    Path(task.marker).write_text(json.dumps(good))
    assert file_task.tail_tokens(file_task.read_marker(task), "A").tolist() == [5, 0]
