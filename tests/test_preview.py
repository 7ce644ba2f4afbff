"""``cpt schedule`` on the project's own YAMLs, and validation of every YAML in yamls/."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cpt import config
from cpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "yamls" / "pythia-410m" / "cpt.yaml"
YAMLS = sorted((ROOT / "yamls").rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(ROOT / "yamls")) for p in YAMLS])
def test_every_yaml_validates(path, tmp_path):
    from omegaconf import OmegaConf

    from cpt.tools.sweep import load_group

    if "pretrain" in OmegaConf.load(path):  # a base model's pre-training schedule (yamls/pretrain/, cpt predict)
        from cpt.tools.predict import pretrain_schedule, schedule_lrs

        lr, scheduler, clock, steps = pretrain_schedule(str(path))
        lrs = schedule_lrs(lr, scheduler, clock, steps)
        assert len(lrs) == steps and lrs.max() == pytest.approx(lr) and lrs[0] == 0.0
    elif "base" in OmegaConf.load(path):  # a sweep group (yamls/paper/): every run in it
        runs = load_group(str(path), str(tmp_path))
        assert runs
        for run in runs:
            config.check(run.cfg, f"{path}: runs.{run.name}")
    else:
        config.check(config.load(str(path)), str(path))


def test_paper_schedule_boundaries(tmp_path, capsys):
    out_csv, out_png = tmp_path / "lr.csv", tmp_path / "lr.png"
    assert main(["schedule", str(PAPER), "--csv", str(out_csv), "--png", str(out_png)]) == 0
    text = capsys.readouterr().out
    tpb = 1104 * 2048
    # 1% of 131,296 batches is 1,312.96: batch 1,313 is the first at the peak
    assert "131,296 batches x 2,260,992 tokens = 296,859,205,632 tokens" in text
    assert f"cosine decay          1,313 {1313 * tpb:>18,}       0.0003" in text
    rows = list(csv.DictReader(out_csv.open()))
    by_batch = {int(r["batch"]): float(r["lr"]) for r in rows}
    assert by_batch[0] == 0.0
    assert by_batch[1313] == pytest.approx(3e-4, rel=1e-6)
    mid = min(b for b in by_batch if b >= 65_000)
    x = (mid - 1312.96) / (131_296 - 1312.96)
    assert by_batch[mid] == pytest.approx(3e-5 + 2.7e-4 * (1 + math.cos(math.pi * x)) / 2, rel=1e-5)
    assert int(rows[-1]["tokens"]) == int(rows[-1]["batch"]) * tpb
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


def test_overrides_and_compare(tmp_path, capsys):
    out_csv = tmp_path / "cmp.csv"
    rc = main(
        [
            "schedule",
            str(PAPER),
            "optimizer.lr=6e-4",
            "scheduler.t_warmup=0.02dur",
            "--csv",
            str(out_csv),
            "--compare",
            str(PAPER),
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(out_csv.open()))
    runs = {r["run"] for r in rows}
    assert runs == {"cpt optimizer.lr=6e-4 scheduler.t_warmup=0.02dur", "cpt"}
    peak = {run: max(float(x["lr"]) for x in rows if x["run"] == run) for run in runs}
    assert peak == {"cpt optimizer.lr=6e-4 scheduler.t_warmup=0.02dur": pytest.approx(6e-4), "cpt": pytest.approx(3e-4)}
    assert "cosine decay          2,626" in capsys.readouterr().out  # 2% of 131,296 = 2,625.92


def test_token_durations_from_yaml(capsys):
    assert main(["schedule", str(PAPER), "max_duration=22609920000tok", "scheduler.t_warmup=226099200tok"]) == 0
    out = capsys.readouterr().out
    assert "10,000 batches x 2,260,992 tokens" in out and "cosine decay            100" in out


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["scheduler.t_warmup=2dur"], "scheduler: t_warmup='2dur' is longer than t_max"),
        (["scheduler.t_warmup=5ep"], "scheduler: t_warmup='5ep' has no known unit"),
        (["scheduler.warmup=5ba"], "unexpected keyword argument 'warmup'"),
        (["cpt.train.slimpajama.proportoin=1"], "unknown key cpt.train.slimpajama.proportoin"),
        (["cpt.eval.intervall=5ba"], "unknown key cpt.eval.intervall"),
        (["max_seq_length=5"], "unknown key 'max_seq_length'"),
        (["model.name=hf_causal_lm"], "key 'model' is built by cpt"),
        (["global_train_batch_size=1000"], "global_train_batch_size=1000 is not divisible"),
        (["device_train_microbatch_size=auto"], "must be an integer"),
        (["cpt.from_scratch=maybe"], "cpt.from_scratch: expected bool"),
        (["oops"], "override 'oops' is not key=value"),
        (["save_filename=ck-{batch}.pt"], "save_filename is cpt's"),
        (["fsdp_config.sharded_ckpt_prefix_dir=ba{batch}"], "fsdp_config.sharded_ckpt_prefix_dir is cpt's"),
        (["autoresume=true"], "autoresume is cpt's"),
        (["load_path=s3://b/x.pt"], "load_path restores an optimizer"),
    ],
)
def test_bad_configs_name_the_key(overrides, message, capsys):
    assert main(["schedule", str(PAPER), *overrides]) == 2
    assert message.split(":")[0].strip("'") in capsys.readouterr().err
    with pytest.raises(config.ConfigError, match=message):
        config.check(config.load(str(PAPER), overrides), str(PAPER))


def test_cli_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "cpt.cli", "schedule", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--csv", "--png", "--compare", "overrides"):
        assert flag in out


def test_a_mistyped_destination_url_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["schedule", str(PAPER), "--png", "s3:/bucket/lr.png"]) == 2
    assert "neither a local path nor an s3:// URL" in capsys.readouterr().err
    assert main(["schedule", str(PAPER), "--csv", "s3://bucket/lr.csv"]) == 2
    assert "must be a local path" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no local folder named s3:


@pytest.mark.parametrize(
    "tokens,expected",
    [
        (0, (1.0, "tokens")),
        (999, (1.0, "tokens")),
        (1000, (1e3, "tokens (thousands)")),
        (262_144, (1e3, "tokens (thousands)")),  # the quickstart's 0.26M tokens: not 0.000262 billions
        (1_000_000, (1e6, "tokens (millions)")),
        (296_866_406_400, (1e9, "tokens (billions)")),  # the paper's run
    ],
)
def test_token_axis_unit_fits_the_run(tokens, expected):
    from cpt.tools.figures import token_axis

    assert token_axis(tokens) == expected
