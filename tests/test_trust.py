"""Untrusted buckets and careless input: nothing runs, nothing escapes, nothing is lost silently.

One test (or table) per class of the review: remote code in model folders, pickled checkpoints, keys that climb
out of their folder, truncated compressed inputs, bad lines of every kind, huge lines, bad configs, secrets.
The locks are in ``test_lock.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import zstandard
from conftest import load_tiny

from cpt import config
from cpt.cli import main
from cpt.data import manifest
from cpt.data.convert import DOMAIN_KEYS, convert
from cpt.data.sources import InputError
from cpt.io import redact, storage, untrusted
from cpt.run.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yamls" / "tiny-cpu.yaml")
PAPER = str(ROOT / "yamls" / "pythia-410m" / "cpt.yaml")
KEY = DOMAIN_KEYS["pile"]


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- 1. model folders never run code ----------------------------------------------------------------------------


def test_a_model_folder_with_code_is_refused_and_its_code_never_runs(tiny, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny / "model", folder)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(config.ConfigError, match="auto_map.*modeling_evil.py.*cpt.trust_remote_code: true"):
        Plan.from_config(load_tiny(tiny, f"variables.model={folder}"), TINY)
    assert not marker.exists()
    out = Plan.from_config(load_tiny(tiny), TINY).to_foundry()  # and remote code is off for llm-foundry as well
    assert out.model.trust_remote_code is False and out.tokenizer.kwargs.trust_remote_code is False


def test_a_model_folder_whose_tokenizer_has_no_eos_is_refused_naming_cpt_model(tiny, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny / "model", folder)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        data["eos_token"] = None  # GPT-NeoX's tokenizer class has a default: say there is none
        (folder / name).write_text(json.dumps(data))
    with pytest.raises(config.ConfigError, match=f"cpt.model: {folder}'s tokenizer has no EOS token"):
        Plan.from_config(load_tiny(tiny, f"variables.model={folder}"), TINY)
    (folder / "model.safetensors").unlink()
    with pytest.raises(config.ConfigError, match="holds no weights"):
        Plan.from_config(load_tiny(tiny, f"variables.model={folder}"), TINY)


# ---- 2. checkpoints are never unpickled blindly --------------------------------------------------------------


def test_a_pickled_payload_in_the_save_folder_is_refused_not_run(tiny, tmp_path, s3_bucket):
    marker = tmp_path / "ran"
    evil = tmp_path / "ep0-ba9-rank0.pt"
    torch.save({"state": {"model": {}, "x": Payload(str(marker))}}, evil)
    for folder in (str(tmp_path / "save"), f"{s3_bucket}/runs/evil"):
        storage.upload_file(str(evil), storage.join(folder, "ep0-ba9-rank0.pt"))
        with pytest.raises(config.ConfigError, match=r"ep0-ba9-rank0.pt: refusing to load.*GLOBAL posix.system"):
            Plan.from_config(load_tiny(tiny, f"variables.save_folder={folder}"), TINY)
    assert main(["export", str(evil), str(tmp_path / "hf")]) == 2
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_a_sharded_checkpoint_with_a_pickled_payload_is_refused(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from cpt.io import safe_load

    folder = tmp_path / "ep0-ba4"
    dcp.save({"w": torch.ones(4), "note": {"step": 4}}, checkpoint_id=str(folder))
    safe_load.check(str(folder))  # a plain one passes
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"\.metadata: refusing.*posix.system"):
        safe_load.check(str(folder))
    assert not marker.exists()


# ---- 3. no key climbs out of its folder -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../../escaped.txt", "a/../../escaped.txt", "./x", "a//b"])
def test_keys_that_would_leave_their_folder_are_refused(key, tmp_path, s3_bucket):
    with pytest.raises(untrusted.UntrustedError, match="refusing the key"):
        untrusted.child(str(tmp_path / "root"), key, "test")
    url = f"{s3_bucket}/models/m"
    storage.write_bytes(f"{url}/config.json", b"{}")
    storage.write_bytes(f"{url}/{key}", b"planted")
    from cpt.model import resolve_folder
    from cpt.tools.export import export

    with pytest.raises(untrusted.UntrustedError, match="refusing the key"):
        resolve_folder(url)
    ck = f"{s3_bucket}/runs/r/ep0-ba4"  # export chooses by the checkpoint rule: a planted key is never fetched
    storage.write_bytes(f"{ck}/.metadata", b"x")
    storage.write_bytes(f"{ck}/{key}", b"planted")
    with pytest.raises(ValueError, match="ep0-ba4: it has no completion marker"):
        export(ck, str(tmp_path / "out"))
    assert not list(tmp_path.rglob("escaped.txt"))


def test_a_marker_naming_a_path_outside_the_checkpoint_is_skipped(tmp_path, s3_bucket, caplog):
    from cpt.run.checkpoints import MARKER, find_resume

    folder = f"{s3_bucket}/runs/marker"
    storage.write_bytes(f"{folder}/ep0-ba4/.metadata", b"x")
    bad = {"world_size": 1, "files": {".metadata": {"bytes": 1, "sha256": ""}, "../../escaped": {"bytes": 1}}}
    storage.write_bytes(f"{folder}/ep0-ba4/{MARKER}", json.dumps(bad).encode())
    with caplog.at_level("WARNING"):
        assert find_resume(folder, str(tmp_path / "cache")) is None
    assert "'../../escaped', which is not a file of a sharded checkpoint" in caplog.text
    assert not list(tmp_path.rglob("escaped"))


def test_a_manifest_slug_that_is_a_path_is_refused(tiny, tmp_path):
    split = tmp_path / "split"
    shutil.copytree(tiny / "data" / "upstream" / "train", split)
    raw = json.loads((split / "manifest.json").read_text())
    name = next(iter(raw["domains"]))
    raw["domains"][name]["slug"] = "../../escaped"
    (split / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(manifest.ManifestError, match=r"domains.Pile-CC.slug '../../escaped' is not a slug"):
        manifest.read(str(split))


# ---- 5. a truncated compressed file is never silently shorter --------------------------------------------------


def _jsonl(docs: int) -> bytes:
    rng = random.Random(3)
    lines = [
        json.dumps({"text": " ".join(rng.choice("abcdefgh") * 3 for _ in range(60)), "meta": {"pile_set_name": "A"}})
    ]
    lines += [lines[0]] * (docs - 1)
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("suffix,cut", [(".zst", 0.5), (".zst", 0.02), (".gz", 0.5), (".gz", 0.75)])
def test_a_truncated_compressed_file_is_an_error_even_when_skipping_bad_lines(suffix, cut, tmp_path, tokenizer_path):
    data = _jsonl(400)
    packed = zstandard.ZstdCompressor().compress(data) if suffix == ".zst" else gzip.compress(data)
    src = tmp_path / f"cut.jsonl{suffix}"
    src.write_bytes(packed[: int(len(packed) * cut)])
    with pytest.raises(InputError, match=f"{src}:\\d+: the compressed file is truncated") as info:
        convert([str(src)], str(tmp_path / "out"), "train", tokenizer_path, KEY, seq_len=64, workers=1,
                skip_bad_lines=True, progress=False)  # fmt: skip
    assert info.value.reason == "truncated_file"
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()  # no manifest claims the input


# ---- 6. every bad line is accounted for ------------------------------------------------------------------------

BAD_LINES = {  # reason -> a line that has it (domain key meta.pile_set_name)
    "malformed_json": b'{"text": "a", "meta": ',
    "invalid_utf8": b'{"text": "\xff\xfe", "meta": {"pile_set_name": "A"}}',
    "deep_nesting": b'{"text": "a", "meta": {"pile_set_name": "A"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge_number": b'{"text": "a", "meta": {"pile_set_name": "A"}, "n": ' + b"9" * 5000 + b"}",
    "bad_text": b'{"text": "lone \\ud800 surrogate", "meta": {"pile_set_name": "A"}}',
    "long_domain": b'{"text": "a", "meta": {"pile_set_name": "' + b"D" * 300 + b'"}}',
    "no_letters": b'{"text": "a", "meta": {"pile_set_name": "!!! ---"}}',
    "collision": b'{"text": "a b c", "meta": {"pile_set_name": "a"}}',  # slug 'a', as domain 'A'
    "missing_domain": b'{"text": "a"}',
    "non_string_text": b'{"text": 5, "meta": {"pile_set_name": "A"}}',
    "not_an_object": b"[1, 2, 3]",
}
GOOD = b'{"text": "a good document of words", "meta": {"pile_set_name": "A"}}'


REASONS = {  # the reason each kind is counted under with --skip-bad-lines
    "malformed_json": "malformed_json",
    "invalid_utf8": "invalid_utf8",
    "deep_nesting": "malformed_json",
    "huge_number": "malformed_json",
    "bad_text": "bad_text",
    "long_domain": "bad_domain",
    "no_letters": "bad_domain",
    "collision": "domain_collision",
    "missing_domain": "missing_domain",
    "non_string_text": "non_string_text",
    "not_an_object": "malformed_json",
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_each_bad_line_stops_the_run_or_is_counted_by_reason(kind, tmp_path, tokenizer_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD + b"\n" + GOOD + b"\n" + BAD_LINES[kind] + b"\n" + GOOD + b"\n")
    with pytest.raises(InputError, match=f"{src}:3: ") as info:
        convert([str(src)], str(tmp_path / "out"), "train", tokenizer_path, KEY, seq_len=64, workers=1, progress=False)
    assert "--skip-bad-lines" in str(info.value) and info.value.reason == REASONS[kind]
    result = convert([str(src)], str(tmp_path / "out"), "train", tokenizer_path, KEY, seq_len=4, workers=1,
                     progress=False, skip_bad_lines=True)  # fmt: skip
    m = result.manifest
    skipped = {**m.unattributed_skipped, **m.domains["A"].docs_skipped}
    assert skipped == {REASONS[kind]: 1} and m.domains["A"].docs_written == 3


def test_a_collision_across_files_names_the_line_that_causes_it(tmp_path, tokenizer_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(GOOD + b"\n")
    second.write_bytes(GOOD.replace(b'"A"', b'"B"') + b"\n" + BAD_LINES["collision"] + b"\n")
    with pytest.raises(InputError, match=f"{second}:2: domain 'a' has the folder name 'a' of domain 'A' \\({first}:1"):
        convert([str(first), str(second)], str(tmp_path / "out"), "train", tokenizer_path, KEY, seq_len=64,
                workers=1, progress=False)  # fmt: skip
    result = convert([str(first), str(second)], str(tmp_path / "out"), "train", tokenizer_path, KEY, seq_len=64,
                     workers=1, progress=False, skip_bad_lines=True)  # fmt: skip
    assert set(result.manifest.domains) == {"A", "B"}
    assert result.manifest.unattributed_skipped == {"domain_collision": 1}


def test_fuzz_hundreds_of_malformed_lines_and_files_are_all_counted(tmp_path, tokenizer_path):
    """Generated files mixing good lines, every kind of bad line and random damage: no traceback, and for every
    domain lines read = written + skipped; every line of every file is counted once."""
    rng = random.Random(11)
    files, total = [], 0
    for f in range(6):
        lines = []
        for _ in range(120):
            roll = rng.random()
            if roll < 0.4:
                dom = rng.choice(["A", "B", "Pile-CC"])
                lines.append(GOOD.replace(b'"A"', json.dumps(dom).encode()))
            elif roll < 0.7:
                lines.append(rng.choice(list(BAD_LINES.values())))
            else:
                good = bytearray(GOOD.replace(b'"A"', b'"B"'))
                for _ in range(rng.randint(1, 4)):  # random damage: flipped, dropped or inserted bytes
                    at = rng.randrange(len(good))
                    op = rng.random()
                    if op < 0.4:
                        good[at] = rng.randrange(256)
                    elif op < 0.7:
                        del good[at]
                    else:
                        good.insert(at, rng.choice(b'{}[]",:\\'))
                lines.append(bytes(good).replace(b"\n", b" "))
        total += len(lines)
        path = tmp_path / f"f{f}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        files.append(str(path))
    result = convert(files, str(tmp_path / "out"), "train", tokenizer_path, KEY, seq_len=16, workers=2,
                     progress=False, skip_bad_lines=True)  # fmt: skip
    m = result.manifest
    for name, d in m.domains.items():
        assert d.docs_read == d.docs_written + sum(d.docs_skipped.values()), name
    counted = sum(d.docs_read for d in m.domains.values()) + sum(m.unattributed_skipped.values())
    assert counted == total
    assert {"malformed_json", "invalid_utf8", "bad_domain", "domain_collision", "missing_domain"} <= set(
        m.unattributed_skipped
    )


# ---- 7. memory stays bounded -----------------------------------------------------------------------------------


def test_a_line_over_max_doc_bytes_is_skipped_or_stops_the_run(tmp_path, tokenizer_path):
    src = tmp_path / "huge.jsonl"
    huge = json.dumps({"text": "word " * 400_000, "meta": {"pile_set_name": "A"}}).encode()  # 2 MB
    src.write_bytes(GOOD + b"\n" + huge + b"\n" + GOOD + b"\n")
    with pytest.raises(InputError, match=f"{src}:2: a line of more than 1,000,000 bytes"):
        convert([str(src)], str(tmp_path / "out"), "train", tokenizer_path, KEY, seq_len=16, workers=1,
                progress=False, max_doc_bytes=1_000_000)  # fmt: skip
    result = convert([str(src)], str(tmp_path / "out"), "train", tokenizer_path, KEY, seq_len=16, workers=1,
                     progress=False, max_doc_bytes=1_000_000, skip_bad_lines=True)  # fmt: skip
    assert result.manifest.unattributed_skipped == {"too_large": 1}
    assert result.manifest.domains["A"].docs_written == 2


# ---- 8. a bad config stops before any work, naming the key -------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer.lr=-1e-4"], "optimizer.lr=-0.0001 must be a positive number"),
        (["optimizer.lr=0"], "optimizer.lr=0 must be a positive number"),
        (["optimizer.lr=.nan"], "optimizer.lr=nan must be a positive number"),
        (["optimizer.lr='3e-4'"], "optimizer.lr='3e-4' must be a positive number"),
        (["optimizer.betas=[0.9,1.0]"], r"optimizer.betas=\[0.9, 1.0\] must be two numbers in \[0, 1\)"),
        (["optimizer.betas=[-0.1,0.95]"], r"optimizer.betas=\[-0.1, 0.95\] must be two numbers"),
        (["global_train_batch_size=0"], "global_train_batch_size=0 must be a positive integer"),
        (["global_train_batch_size=4.5"], "global_train_batch_size=4.5 must be a positive integer"),
        (["device_eval_batch_size=0"], "device_eval_batch_size=0 must be a positive integer"),
        (["cpt.train.slimpajama.proportion=.nan"], "cpt.train.slimpajama.proportion=nan must be a positive number"),
        (["cpt.eval.interval=often"], "cpt.eval.interval='often' has no known unit"),
        (["cpt.eval.interval=1.5.3ba"], "cpt.eval.interval='1.5.3ba' is not a number followed by a unit"),
        (["save_interval=0ba"], "save_interval='0ba' must be longer than zero"),
        (["save_folder=s3:/my-bucket/x"], "save_folder: 's3:/my-bucket/x' is neither a local path nor an s3:// URL"),
        (["save_folder=S3://my-bucket/x"], "save_folder: 'S3://my-bucket/x' is neither a local path"),
        (["save_folder=s3//my-bucket/x"], "save_folder: 's3//my-bucket/x' is neither a local path"),
        (["variables.bucket=s3:/b"], "cpt.train.slimpajama.path: 's3:/b/data/slimpajama/train' is neither"),
        (["variables.run_name=/tmp/elsewhere"], "run_name='/tmp/elsewhere' must be a plain name"),
        (["variables.run_name=../up"], "run_name='../up' must be a plain name"),
        (["cpt.keep_checkpoints=-1"], "cpt.keep_checkpoints=-1 must be at least 0"),
        (["cpt.s3_retry_s=0"], "cpt.s3_retry_s=0.0 must be a positive number"),
        (["log_config=true"], "log_config is cpt's"),
    ],
)
def test_bad_values_stop_before_any_work_naming_the_key(overrides, message, capsys):
    assert main(["schedule", PAPER, *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("config error: ")
    with pytest.raises(config.ConfigError, match=message):
        config.check(config.load(PAPER, overrides), PAPER)


def test_an_unreachable_bucket_is_a_config_error_naming_it(tiny, s3_bucket):
    with pytest.raises(config.ConfigError, match=f"{s3_bucket}-missing"):
        Plan.from_config(load_tiny(tiny, f"variables.save_folder={s3_bucket}-missing/ck"), TINY)


# ---- 9. secrets stay secret ---------------------------------------------------------------------------------


def test_a_sweep_never_writes_a_resolved_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CPT_TEST_SECRET", "hunter2-very-secret")
    base = tmp_path / "base.yaml"
    text = Path(PAPER).read_text().replace("loggers: {}", "loggers: {wandb: {api_key: '${oc.env:CPT_TEST_SECRET}'}}")
    base.write_text(text)
    group = tmp_path / "group.yaml"
    group.write_text(f"base: {base}\nruns: {{a: {{optimizer.lr: 1.0e-4}}}}\n")
    assert main(["sweep", str(group), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    written = (tmp_path / "out" / "a.yaml").read_text()
    assert "hunter2" not in written and "${oc.env:CPT_TEST_SECRET}" in written
    assert "hunter2" not in capsys.readouterr().out


def test_secret_values_and_url_credentials_are_masked():
    shown = redact.config(
        {
            "loggers": {"wandb": {"api_key": "k-123"}, "mlflow": {"tracking_uri": "https://bob:pw1@mlflow.example"}},
            "variables": {"aws_secret_access_key": "abc", "bucket": "s3://b"},
            "max_seq_len": 2048,
            "tokens_per_domain": 5,
        }
    )
    assert shown["loggers"]["wandb"]["api_key"] == "***" and shown["variables"]["aws_secret_access_key"] == "***"
    assert shown["loggers"]["mlflow"]["tracking_uri"] == "https://***@mlflow.example"
    assert shown["variables"]["bucket"] == "s3://b" and shown["tokens_per_domain"] == 5


def test_credentials_in_the_endpoint_url_never_reach_an_error_message(monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://admin:topsecret@127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setattr(storage, "_retry_s", 1.0)
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes("s3://bucket/key")
    assert "topsecret" not in str(info.value) and "admin" not in str(info.value)


def test_the_run_logs_its_config_with_secrets_masked(tiny):
    out = Plan.from_config(load_tiny(tiny, "variables.run_name=masked", "loggers={wandb: {api_key: k-123}}"), TINY)
    foundry = out.to_foundry()
    assert foundry.log_config is False
    shown = foundry.callbacks.cpt_config_log.config
    assert shown.loggers.wandb.api_key == "***" and foundry.loggers.wandb.api_key == "k-123"


# ---- 10. sweeps -------------------------------------------------------------------------------------------------


def test_a_sweep_run_name_cannot_leave_out_and_commands_are_quoted(tmp_path, capsys):
    group = tmp_path / "group.yaml"
    group.write_text(f"base: {PAPER}\nruns: {{'../../escape': {{optimizer.lr: 1.0e-4}}}}\n")
    assert main(["sweep", str(group), "--out", str(tmp_path / "out")]) == 2
    assert "a run name must be a plain name" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escape.yaml"))
    group.write_text(f"base: {PAPER}\nruns: {{a: {{optimizer.lr: 1.0e-4}}}}\n")
    out = tmp_path / "my runs"
    assert main(["sweep", str(group), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f"a: composer -n 8 -m cpt.train '{out / 'a.yaml'}'"
    command = line.split(" ", 1)[1]  # as a shell reads it: the path with its space is one word
    listed = subprocess.run(["bash", "-c", f"ls {command.split(' ', 5)[-1]}"], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.strip() == str(out / "a.yaml")
