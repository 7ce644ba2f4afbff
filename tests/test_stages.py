"""Chains of continual stages, anneal branches and checkpoint averaging, through real cpt runs.

A probe callback (registered in the run's own process) records the state right after the checkpoint is loaded
and the LR of every batch; the expected values come from the trunk's checkpoint file and the schedules' pure
functions, not from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import prewarmed
import pytest
import torch
from test_resume import assert_identical, finish

from cpt.cli import main
from cpt.io import storage
from cpt.optim import schedules
from cpt.run import samples

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yamls" / "tiny-cpu.yaml"
LR = 3e-4  # tiny-cpu.yaml's optimizer.lr

PROBE = """
import hashlib, json, sys
import torch
from composer.core import Callback
from llmfoundry.registry import callbacks

def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

class Probe(Callback):
    def __init__(self):
        self.out = {"lr": {}}
    def after_load(self, state, logger):
        opt = state.optimizers[0]
        moments = [opt.state[p][k] for g in opt.param_groups for p in g["params"] if p in opt.state
                   for k in ("exp_avg", "exp_avg_sq")]
        self.out.update(batch=int(state.timestamp.batch), moments=digest(moments) if moments else None,
                        weights=digest([p for _, p in sorted(state.model.model.named_parameters())]))
    def batch_start(self, state, logger):
        self.out["lr"][int(state.timestamp.batch)] = state.optimizers[0].param_groups[0]["lr"]
    def fit_end(self, state, logger):
        print("PROBE " + json.dumps(self.out), flush=True)

callbacks.register("cpt_test_probe", func=Probe)
from cpt.train import main
sys.exit(main(sys.argv[1:] + ["callbacks.cpt_test_probe={}"]))
"""


def probe(setup: Path, yaml: str, *overrides: str, env: dict | None = None) -> dict:
    proc = prewarmed.shared().launch(
        ["-c", PROBE, yaml, f"cpt.run_dir={setup / 'runs'}", "cpt.num_workers=0", *overrides],
        cwd=str(setup),
        env={**os.environ, "CPT_CACHE": str(setup / "cache" / "probe"), **(env or {})},
    )
    out = finish(proc)
    line = [ln for ln in out.splitlines() if ln.startswith("PROBE ")][-1]
    out = json.loads(line[len("PROBE ") :])
    out["lr"] = {int(k): v for k, v in out["lr"].items()}
    return out


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state"]


def moments_of(state: dict) -> str:
    opt = next(iter(state["optimizers"].values()))
    ids = [i for g in opt["param_groups"] for i in g["params"]]
    return digest([opt["state"][i][k] for i in ids if i in opt["state"] for k in ("exp_avg", "exp_avg_sq")])


def tiny_cosine(t: float) -> float:
    """tiny-cpu.yaml's schedule over 16 batches (the trunk's max_duration), by its formula."""
    return schedules.cosine_multiplier(t, t_warmup=0.125 * 16, t_max=16, alpha_i=0.0, alpha_f=0.1)


@pytest.fixture(scope="module")
def setup(run_project):
    return run_project


@pytest.fixture(scope="module")
def trunk(uninterrupted) -> str:
    """A finished trunk: 16 batches, a checkpoint every 4, every trained sample logged (shared with test_resume)."""
    return uninterrupted


def rows_at(path: Path, batch: int) -> dict:
    """Every value a run's ``metrics.jsonl`` logged at ``batch``, merged (the rows written before it trained on)."""
    merged = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["batch"] == batch:
            merged.update(row)
    return merged


def files_of(folder: str) -> dict[str, bytes]:
    return {k: Path(folder, k).read_bytes() for k in storage.list_prefix(folder)}


def test_a_branch_starts_from_the_trunks_exact_state_and_follows_its_decay(setup, trunk, capsys):
    before = files_of(trunk)
    out = setup / "branches"
    assert main(["anneal", trunk, "--at", "8", "--length", "4ba", "--shape", "cosine", "--to", "0.01",
                 "--out", str(out), "--gpus", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    yaml = str(out / "trunk-anneal8-cosine-4ba.yaml")
    assert f"wrote {yaml}" in printed and f"composer -n 1 -m cpt.train {yaml}" in printed
    got = probe(setup, yaml, "cpt.log_samples=true")

    ck = checkpoint_state(f"{trunk}/ep0-ba8-rank0.pt")
    assert got["batch"] == 8  # the trunk's clock
    assert got["moments"] == moments_of(ck)  # bit-equal optimizer state after load
    weights = ck["model"]
    assert got["weights"] == digest([weights[k] for k in sorted(weights)])
    m0 = tiny_cosine(8)
    for t in range(8, 12):  # batch t trains at lr x m(t): the decay from the trunk's value
        expected = LR * schedules.anneal_multiplier(t, 8, 4, m0, 0.01, "cosine")
        assert got["lr"][t] == pytest.approx(expected, rel=1e-9), t
    assert got["lr"][8] == pytest.approx(LR * m0, rel=1e-9)  # continuous with the trunk at the branch point
    # the branch is evaluated at its first batch, before it trains: on the trunk's weights of batch 8, so exactly
    # what the trunk measured there; and that batch's LR is logged there
    trunk_rows = rows_at(setup / "runs" / "trunk" / "metrics.jsonl", 8)
    branch_rows = rows_at(setup / "runs" / "trunk-anneal8-cosine-4ba" / "metrics.jsonl", 8)
    evals = {k: v for k, v in trunk_rows.items() if k.startswith("metrics/eval/")}
    assert len(evals) >= 4 and {k: branch_rows.get(k) for k in evals} == evals
    lrs = [v for k, v in branch_rows.items() if k.startswith("lr-")]
    assert lrs == [pytest.approx(LR * m0, rel=1e-9)]

    trunk_batches, _ = samples.read(str(setup / "runs" / "trunk" / "samples-rank0.jsonl"))
    branch_batches, _ = samples.read(str(setup / "runs" / "trunk-anneal8-cosine-4ba" / "samples-rank0.jsonl"))
    assert branch_batches == trunk_batches[8:12]  # the same data stream from the same position (batches 8-11)
    assert files_of(trunk) == before  # the trunk's folder is byte-identical
    branch_folder = str(setup / "trunk-checkpoints-trunk-anneal8-cosine-4ba")
    assert "ep0-ba12-rank0.pt" in storage.list_children(branch_folder)[0]


def test_a_preempted_branch_ends_bit_identical_to_an_uninterrupted_one(setup, trunk):
    out = setup / "branches-kill"
    assert main(["anneal", trunk, "--at", "8", "--length", "8ba", "--to", "0.0", "--out", str(out)]) == 0
    yaml = str(out / "trunk-anneal8-linear-8ba.yaml")
    ref_folder, run_folder = str(setup / "branch-ref"), str(setup / "branch-killed")

    def run(folder: str, name: str, fault: str = ""):
        return prewarmed.shared().launch(
            ["-m", "cpt.train", yaml, f"save_folder={folder}", f"run_name={name}", f"cpt.run_dir={setup / 'runs'}",
             "cpt.num_workers=0", "save_interval=2ba"],
            cwd=str(setup), env={**os.environ, "CPT_CACHE": str(setup / "cache" / name), "CPT_FAULT": fault},
        )  # fmt: skip

    finish(run(ref_folder, "branch-ref"))
    proc = run(run_folder, "branch-killed", fault="step:13")
    out_text, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out_text[-3000:]
    resumed = finish(run(run_folder, "branch-killed"))
    assert "resuming from" in resumed and "ep0-ba12-rank0.pt" in resumed
    a = torch.load(f"{ref_folder}/ep0-ba16-rank0.pt", map_location="cpu", weights_only=False)["state"]
    b = torch.load(f"{run_folder}/ep0-ba16-rank0.pt", map_location="cpu", weights_only=False)["state"]
    assert_identical(a["model"], b["model"], "model")
    assert_identical(a["optimizers"], b["optimizers"], "optimizers")
    assert a["dataset_state"] == b["dataset_state"]


@pytest.mark.parametrize("carry", [[], ["optimizer"], ["optimizer", "clock"]])
def test_each_carry_choice_restores_what_it_says_and_only_that(setup, trunk, carry):
    init = f"cpt.init={{from: {trunk}/ep0-ba8-rank0.pt, carry: [{', '.join(carry)}]}}"
    name = "stage2-" + ("-".join(carry) or "weights")
    scheduler = "scheduler={name: cpt_infinite, t_warmup: 2ba, t_cooldown: 2ba, alpha_const: 0.5, t_max: 1dur}"
    got = probe(
        setup,
        str(TINY),
        f"variables.data={setup / 'data'}",
        f"variables.model={setup / 'model'}",
        f"variables.run_name={name}",
        f"variables.save_folder={setup / name}",
        "max_duration=12ba",
        scheduler,
        init,
        "cpt.log_samples=true",
    )
    ck = checkpoint_state(f"{trunk}/ep0-ba8-rank0.pt")
    assert got["weights"] == digest([ck["model"][k] for k in sorted(ck["model"])])  # weights: always
    clock = "clock" in carry
    assert got["batch"] == (8 if clock else 0)
    assert got["moments"] == (moments_of(ck) if "optimizer" in carry else None)
    # the LR is this stage's schedule at its own clock, never the trunk's last LR
    first = 8 if clock else 0
    expected = LR * schedules.infinite_multiplier(first, 2, 2, alpha_const=0.5)
    assert got["lr"][first] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    if not clock:  # no data position either: the stage's stream starts where the trunk's did
        trunk_batches, _ = samples.read(str(setup / "runs" / "trunk" / "samples-rank0.jsonl"))
        stage_batches, _ = samples.read(str(setup / "runs" / name / "samples-rank0.jsonl"))
        assert stage_batches[0] == trunk_batches[0]


def test_continuing_the_clock_into_an_ended_cosine_is_refused(setup, trunk):
    from cpt import config
    from cpt.run.plan import Plan

    cfg = config.load(
        str(TINY),
        [
            f"variables.data={setup / 'data'}",
            f"variables.model={setup / 'model'}",
            "variables.run_name=stage-ended",
            f"variables.save_folder={setup / 'stage-ended'}",
            f"cpt.run_dir={setup / 'runs'}",
            "max_duration=20ba",
            "scheduler.t_max=10ba",
            f"cpt.init={{from: {trunk}/ep0-ba12-rank0.pt, carry: [optimizer, clock]}}",
        ],
    )
    with pytest.raises(config.ConfigError, match="cpt_cosine schedule's decay ended at batch"):
        Plan.from_config(cfg, str(TINY))
    with pytest.raises(config.ConfigError, match=r"cpt.init.carry=\['clock'\] must be"):
        config.check(config.load(str(TINY), [f"cpt.init={{from: {trunk}, carry: [clock]}}"]), str(TINY))


def test_an_average_equals_the_mean_computed_here(setup, trunk, tmp_path):
    from safetensors.torch import load_file

    assert main(["average", trunk, str(tmp_path / "uniform"), "--last", "2"]) == 0
    assert main(["average", trunk, str(tmp_path / "ema"), "--from", "8", "--to", "16", "--ema", "0.5"]) == 0
    w = {b: checkpoint_state(f"{trunk}/ep0-ba{b}-rank0.pt")["model"] for b in (8, 12, 16)}
    uniform, ema = (
        load_file(tmp_path / "uniform" / "model.safetensors"),
        load_file(tmp_path / "ema" / "model.safetensors"),
    )
    for key, value in uniform.items():
        full = f"model.{key}"
        mean = (w[12][full].double() + w[16][full].double()) / 2
        assert torch.allclose(value.double(), mean, atol=1e-6), key
        by_hand = 0.5 * (0.5 * w[8][full].double() + 0.5 * w[12][full].double()) + 0.5 * w[16][full].double()
        assert torch.allclose(ema[key].double(), by_hand, atol=1e-6), key
    assert main(["average", trunk, str(tmp_path / "none"), "--from", "100"]) == 2


def test_evaluate_equals_the_models_own_loss(setup):
    """The demo's evaluation of a Hugging Face folder, against HF's own (mean) loss on the same samples."""
    from transformers import GPTNeoXForCausalLM

    from cpt.data.manifest import read
    from cpt.tools.branches import _samples, evaluate

    split = str(setup / "data" / "upstream" / "val")
    got = evaluate(str(setup / "model"), {"up": split})["up"]
    model = GPTNeoXForCausalLM.from_pretrained(setup / "model").eval()
    total = count = 0
    for _, stats in read(split).domains.items():
        for tokens in _samples(f"{split}/{stats.slug}"):
            ids = torch.as_tensor(tokens.astype("int64"))[None]
            with torch.no_grad():
                total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert count > 0 and got == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_the_branches_demo_runs_and_says_what_held(tmp_path):
    from cpt.tools.branches import branches_demo

    s = branches_demo(str(tmp_path / "demo"), steps=24, every=4, length=4)
    assert s["averaged_batches"] == [16, 20, 24]
    assert set(s["loss"]) == {
        "trunk (constant LR)", "branch at 12", "branch at 20 (ends with the trunk)", "cosine",
        "average of batches [16, 20, 24]",
    }  # fmt: skip
    assert all(0 < v < 20 for model in s["loss"].values() for v in model.values())
    assert len(s["held"]) == 3 and all(isinstance(v, bool) for v in s["held"].values())
    text = (tmp_path / "demo" / "branches.md").read_text()
    assert text.count("yes") + text.count("NO") == 3
    for f in ("loss.png", "lr.png", "summary.md", "branches/trunk-anneal12-1-sqrt-4ba.yaml"):
        assert (tmp_path / "demo" / f).is_file(), f
    assert "- `trunk-anneal20-1-sqrt-4ba` leaves `trunk`" in (tmp_path / "demo" / "summary.md").read_text()
    # the CPT law fitted on the trunk and its last branch predicts the cosine run (or says why it cannot)
    law = s["law"]
    if "refused" in law:
        assert law["refused"] in text
    else:
        assert set(law) == {"upstream/all", "downstream/all"}
        assert f"| upstream | {law['upstream/all']['final_error']:+.4f} |" in text


def test_outputs_are_never_overwritten_silently_nor_written_into_the_save_folder(trunk, tmp_path, capsys, caplog):
    """``cpt export`` and ``cpt average`` into an existing OUT: refused, or cleared with ``--overwrite``; an OUT that
    is a file, or inside the save folder, is refused; a folder broken half-way is skipped as resume skips it."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    ck = f"{trunk}/ep0-ba16-rank0.pt"
    assert main(["export", ck, str(out)]) == 2
    assert "already holds stale.txt" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert main(["export", ck, str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    assert main(["average", trunk, str(tmp_path / "file"), "--last", "2"]) == 2
    assert "is a file" in capsys.readouterr().err
    before = sorted(os.listdir(trunk))
    assert main(["average", trunk, f"{trunk}/averaged", "--last", "2"]) == 2
    assert "would hold it" in capsys.readouterr().err and sorted(os.listdir(trunk)) == before
    broken = tmp_path / "broken"
    broken.mkdir()
    for b in (8, 12):
        shutil.copy(f"{trunk}/ep0-ba{b}-rank0.pt", broken)
    data = Path(trunk, "ep0-ba16-rank0.pt").read_bytes()
    (broken / "ep0-ba16-rank0.pt").write_bytes(data[: len(data) // 2])  # truncated: skipped, named
    assert main(["average", str(broken), str(tmp_path / "avg"), "--last", "3"]) == 0
    assert "averaged batches [8, 12]" in capsys.readouterr().out
    assert "skipping" in caplog.text and "ep0-ba16-rank0.pt" in caplog.text
    assert (broken / "ep0-ba16-rank0.pt").exists()  # another run's folder is only read
