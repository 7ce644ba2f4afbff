"""``cpt sweep`` over the paper's groups: every run validates, previews and gets an exact launch command."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpt import config
from cpt.cli import main
from cpt.tools.sweep import load_group

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "warmup": 4,
    "max_lr": 3,
    "constant": 1,
    "from_scratch": 1,
    "checkpoints": 3,
    "pile_rewarm": 1,
    "replay": 5,
    "infinite": 4,
    "chain": 2,
}


@pytest.mark.parametrize("group,count", GROUPS.items())
def test_group_dry_run(group, count, tmp_path, capsys):
    path = ROOT / "yamls" / "paper" / f"{group}.yaml"
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    runs = load_group(str(path), str(tmp_path))
    assert len(runs) == count
    folders = set()
    for run in runs:
        assert f"{run.name}: composer -n 8 -m cpt.train {tmp_path / (run.name + '.yaml')}" in out
        written = config.load(run.path)  # the written file is exactly what training will read
        config.check(written, run.path)
        folders.add(written.save_folder)
        assert written.run_name == f"pythia-410m-cpt-warm1-lr3e-4-{run.name}"
    assert len(folders) == count  # every run has its own save folder


def test_mapping_overrides_replace_the_subtree(tmp_path):
    replay = {r.name: r.cfg for r in load_group(str(ROOT / "yamls/paper/replay.yaml"), str(tmp_path))}
    assert replay["replay-5"].cpt.train.pile.proportion == 0.05
    assert replay["replay-5"].cpt.train.pile.path == "s3://my-bucket/data/pile/train"
    pile = load_group(str(ROOT / "yamls/paper/pile_rewarm.yaml"), str(tmp_path))[0].cfg
    assert list(pile.cpt.train) == ["pile"]
    const = load_group(str(ROOT / "yamls/paper/constant.yaml"), str(tmp_path))[0].cfg
    assert dict(const.scheduler) == {"name": "cpt_constant", "t_warmup": "0ba"} and const.optimizer.lr == 3e-5


def test_bad_group_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: ../nope.yaml\nruns: {a: {optimizer.lr: 1}}\n")
    with pytest.raises(config.ConfigError, match="base config .*nope.yaml not found"):
        load_group(str(bad), str(tmp_path))
    bad.write_text(f"base: {ROOT / 'yamls/pythia-410m/cpt.yaml'}\nruns: {{a: {{scheduler.t_warmup: 5ep}}}}\n")
    assert main(["sweep", str(bad), "--dry-run", "--out", str(tmp_path)]) == 2
