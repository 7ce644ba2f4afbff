"""``cpt quickstart`` end to end: the paper's directions at toy scale, from the numbers it measured."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil

import pytest

from cpt.run.checkpoints import MARKER
from cpt.tools import report
from cpt.tools.quickstart import quickstart
from cpt.tools.report import directions


@pytest.fixture(scope="module")
def qs(tmp_path_factory):
    """``cpt quickstart`` run once for the module: its folder and its summary."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    return tmp_path, quickstart(str(tmp_path / "qs"))


def test_quickstart_reproduces_the_papers_directions(qs):
    tmp_path, s = qs
    c, r1, r2 = s["constant"], s["rewarm-1x"], s["rewarm-2x"]
    # re-warming raises the loss on both domains during its first steps
    for r in (r1, r2):
        assert r["upstream_early_max"] > r["upstream_start"] and r["downstream_early_max"] > r["downstream_start"]
    # the higher max LR forgets more and adapts more; constant LR forgets least and adapts least
    assert r2["upstream_final"] > r1["upstream_final"] > c["upstream_final"]
    assert r2["downstream_final"] < r1["downstream_final"] < c["downstream_final"]
    assert all(r["upstream_start"] == c["upstream_start"] for r in (r1, r2))  # all start from the same weights
    assert all(directions(s, "constant", {"constant": 5e-4, "rewarm-1x": 5e-3, "rewarm-2x": 1e-2}).values())
    report = (tmp_path / "qs" / "summary.md").read_text()
    assert "NO:" not in report and report.count("- yes: ") == 6
    assert f"{r2['downstream_final']:.4f}" in report and f"{c['forgetting']:+.4f}" in report
    # the generated task: scored in every run, its first and last accuracy in the table (40 questions: k/40)
    for r in (c, r1, r2):
        assert r["next_word_start"] == c["next_word_start"]  # the same pre-trained weights
        assert round(r["next_word_final"] * 40, 4) == round(r["next_word_final"] * 40)
    assert f"{r2['next_word_start']:.3f} -> {r2['next_word_final']:.3f}" in report
    for png in ("loss.png", "lr.png", "forgetting.png", "tasks.png"):
        assert (tmp_path / "qs" / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "qs" / "summary.json").read_text()) == s
    # the pre-trained model was exported as a Hugging Face folder and every continual run started from it
    assert (tmp_path / "qs" / "pretrained" / "config.json").is_file()


def test_predict_fits_curves_and_sweeps_the_quickstarts_runs(qs, capsys):
    """``cpt predict`` on the quickstart's runs: the leave-one-out table is in the summary; ``fit`` on two runs and
    ``curve`` on the third's YAML give the same final prediction as the leave-one-out (which used the LRs the run
    logged, where ``curve`` computes them with the schedule functions); ``sweep`` ranks a grid with a front."""
    from cpt.cli import main

    tmp_path, s = qs
    work = tmp_path / "qs"
    law = json.loads((work / "law-check.json").read_text())
    assert set(law) == {"constant", "rewarm-1x", "rewarm-2x"}
    summary = (work / "summary.md").read_text()
    assert "## The CPT law, leave one out" in summary
    for held, domains in law.items():
        for key, r in domains.items():
            assert r["held"] == (abs(r["final_error"]) <= 0.02 and abs(r["final_error"]) <= r["spread"] / 4)
            assert f"| {held} | {key.split('/')[0]} | {r['final_error']:+.4f} |" in summary
            assert f"| {r['spread']:.4f} | {r['sd_end']:.2g} | {'yes' if r['held'] else 'NO'} |" in summary
    runs = [str(work / "runs" / f"cpt-{n}") for n in ("constant", "rewarm-1x")]
    out = work / "law.json"
    assert main(["predict", "fit", *runs, "--pretrain", str(work / "runs" / "pretrain"), "--out", str(out)]) == 0
    fitted = json.loads(out.read_text())["domains"]
    assert {"upstream/all", "downstream/all", "upstream/prose", "downstream/science"} <= set(fitted)
    assert main(["predict", "curve", str(out), str(work / "cpt-rewarm-2x.yaml"), "--out", str(work / "pred")]) == 0
    with open(work / "pred.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 101 and (work / "pred.png").read_bytes()[:4] == b"\x89PNG"
    measured = report.load(str(work / "runs" / "cpt-rewarm-2x"))
    end = measured.series("metrics/eval/upstream/all/LanguageCrossEntropy")[-1][2]
    predicted_end = float(rows[-1]["upstream/all"])
    assert predicted_end - end == pytest.approx(law["rewarm-2x"]["upstream/all"]["final_error"], abs=1e-5)
    sd_end = float(rows[-1]["upstream/all sd"])  # each prediction carries its standard error, in the CSV too
    assert 0 < sd_end < math.inf and sd_end == pytest.approx(law["rewarm-2x"]["upstream/all"]["sd_end"], rel=1e-2)
    # cpt report --law: each run's law curve over its measured one, from the LRs it logged (the same end)
    labelled = [report.load(str(work / "runs" / f"cpt-{n}"), label=n) for n in ("constant", "rewarm-2x")]
    from cpt.tools.predict import overlay

    drawn = report._law_curves(labelled, overlay(labelled, str(out)), 1.0)
    assert drawn["rewarm-2x"]["upstream"][1][-1] == pytest.approx(predicted_end, abs=1e-6)
    runs_args = [str(work / "runs" / f"cpt-{n}") for n in ("constant", "rewarm-2x")]
    assert main(["report", *runs_args, "--law", str(out), "--out", str(work / "with-law")]) == 0
    assert (work / "with-law" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    grid = ["--grid", "optimizer.lr=1e-3,5e-3,1e-2", "scheduler.t_warmup=0.05dur,0.2dur"]
    assert (
        main(["predict", "sweep", str(out), str(work / "cpt-rewarm-2x.yaml"), *grid, "--png", str(work / "f.png")]) == 0
    )
    table = capsys.readouterr().out
    assert table.count("optimizer.lr=") == 6 and "(Pareto front)" in table
    assert main(["predict", "sweep", str(out), str(work / "cpt-rewarm-2x.yaml"), "--grid",
                 "cpt.train.downstream.proportion=0.5,1"]) == 2  # fmt: skip
    assert "replay is not in the law" in capsys.readouterr().err
    # a run whose logged LR is not a number the law can use is refused, naming the run and the batch
    bad = work / "runs" / "bad-lr"
    shutil.copytree(work / "runs" / "cpt-constant", bad)
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if '"lr-' in ln)
    row = json.loads(lines[at])
    row.update({k: -0.5 for k in row if k.startswith("lr-")})
    lines[at] = json.dumps(row)
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["predict", "fit", str(bad), runs[1], "--out", str(work / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: the LR of batch {row['batch']} is -0.5, not a finite non-negative number" in err, err
    assert not (work / "bad.json").exists()


def test_export_gives_the_checkpoints_logits(tmp_path):
    """``cpt export``: the HF folder loads with transformers and matches the checkpoint's weights exactly."""
    import torch
    from composer.models import HuggingFaceModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.cli import main
    from cpt.pythia import save_tiny_pythia

    src = save_tiny_pythia(str(tmp_path / "src"), seed=3)
    hf = AutoModelForCausalLM.from_pretrained(src)
    ckpt = tmp_path / "ep0-ba0-rank0.pt"  # a checkpoint's name: export chooses by the checkpoint rule
    model = HuggingFaceModel(hf, tokenizer=AutoTokenizer.from_pretrained(src))
    from composer import Trainer

    trainer = Trainer(model=model, device="cpu", progress_bar=False, log_to_console=False)
    trainer.save_checkpoint(str(ckpt))
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[12092, 1533, 0, 510, 3158]])
    with torch.no_grad():
        assert torch.equal(out(ids).logits, hf(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("Hello world")["input_ids"] == [12092, 1533]


def test_export_to_s3_lands_in_the_bucket(tmp_path, s3_bucket, monkeypatch, capfd):
    """``cpt export CKPT s3://...`` writes the folder into the bucket (and nothing into a local ``s3:`` folder);
    a mistyped URL is refused before any work."""
    import torch
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.cli import main
    from cpt.io import storage
    from cpt.pythia import save_tiny_pythia

    src = save_tiny_pythia(str(tmp_path / "src"), seed=5)
    hf = AutoModelForCausalLM.from_pretrained(src)
    trainer = Trainer(model=HuggingFaceModel(hf, tokenizer=AutoTokenizer.from_pretrained(src)), device="cpu")
    ckpt = tmp_path / "ep0-ba0-rank0.pt"  # a checkpoint's name: export chooses by the checkpoint rule
    trainer.save_checkpoint(str(ckpt))
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(ckpt), f"{s3_bucket}/exports/hf"]) == 0
    assert f"wrote {s3_bucket}/exports/hf" in capfd.readouterr().out
    keys = set(storage.list_prefix(f"{s3_bucket}/exports/hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json", ".cpt-complete"} <= keys  # the marker: last
    assert not (tmp_path / "s3:").exists()
    back = tmp_path / "back"
    for key in keys:
        storage.download_file(f"{s3_bucket}/exports/hf/{key}", str(back / key))
    ids = torch.tensor([[12092, 1533, 0, 510, 3158]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(back)(ids).logits, hf(ids).logits)

    assert main(["export", str(ckpt), f"s3:/{s3_bucket[5:]}/typo"]) == 2
    assert "neither a local path nor an s3:// URL" in capfd.readouterr().err
    assert not (tmp_path / "s3:").exists()


def test_quickstart_on_s3(tmp_path, s3_bucket):
    """``cpt quickstart --s3``: data, checkpoints and metrics on the S3 endpoint (shortened to a few steps)."""

    from cpt.io import storage

    s = quickstart(str(tmp_path / "qs"), s3=f"{s3_bucket}/qs", pretrain_steps=6, cpt_steps=4)
    assert set(s) == {"constant", "rewarm-1x", "rewarm-2x"}
    assert all(math.isfinite(v) for run in s.values() for v in run.values())
    keys = storage.list_prefix(f"{s3_bucket}/qs")
    for name in ("upstream", "downstream"):
        for split in ("train", "val"):
            assert f"data/{name}/{split}/manifest.json" in keys
    assert "runs/pretrain/checkpoints/ep0-ba6-rank0.pt" in keys
    for run in ("constant", "rewarm-1x", "rewarm-2x"):
        assert f"runs/cpt-{run}/checkpoints/ep0-ba4-rank0.pt" in keys
        assert f"runs/cpt-{run}/checkpoints/metrics.jsonl" in keys
    assert (tmp_path / "qs" / "summary.md").is_file() and (tmp_path / "qs" / "pretrained" / "config.json").is_file()
    # 4 steps leave too few evaluations for the law's 7 parameters: the leave-one-out says so instead of a number
    law = json.loads((tmp_path / "qs" / "law-check.json").read_text())
    assert all("cannot fit the law's 7 parameters" in v["refused"] for v in law.values())
    assert "the fit was refused" in (tmp_path / "qs" / "summary.md").read_text()


def test_export_of_a_sharded_checkpoint_on_s3(tmp_path, s3_bucket):
    """A sharded FSDP checkpoint: Composer's layout (``{'state': state.state_dict(), 'rng': ...}`` written by
    torch.distributed.checkpoint into ``ep*-ba*/``), read from S3. FSDP itself needs a GPU, so the folder is
    written here by the same DCP writer Composer uses, from a CPU Trainer's state."""
    import torch
    import torch.distributed.checkpoint as dcp
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from composer.utils import reproducibility
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.cli import main
    from cpt.io import storage
    from cpt.pythia import save_tiny_pythia

    src = save_tiny_pythia(str(tmp_path / "src"), seed=4)
    hf = AutoModelForCausalLM.from_pretrained(src)
    model = HuggingFaceModel(hf, tokenizer=AutoTokenizer.from_pretrained(src))
    trainer = Trainer(model=model, device="cpu", progress_bar=False, log_to_console=False)
    folder = tmp_path / "ep0-ba8"
    state = {"state": trainer.state.state_dict(), "rng": reproducibility.get_rng_state()}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))
    assert (folder / ".metadata").is_file() and (folder / "__0_0.distcp").is_file()
    files = {f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
             for f in folder.iterdir()}  # fmt: skip
    (folder / MARKER).write_text(json.dumps({"world_size": 1, "files": files}))  # as cpt's upload marks it
    for f in folder.iterdir():
        storage.upload_file(str(f), f"{s3_bucket}/run/ep0-ba8/{f.name}")

    assert main(["export", f"{s3_bucket}/run/ep0-ba8", str(tmp_path / "out")]) == 0
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[12092, 1533, 0, 510, 3158]])
    with torch.no_grad():
        assert torch.equal(out(ids).logits, hf(ids).logits)


def test_bursty_text_keeps_the_word_frequencies_and_repeats_words_within_documents():
    """The quickstart's downstream: the upstream's words at nearly the same overall frequencies (what the
    pre-trained model already knows), but each document dwells on a few of them (what it has to learn)."""
    import collections
    import random

    from cpt.data.synthetic import document

    def stats(style: str, seed: int) -> tuple[dict, float]:
        rng, counts, distinct = random.Random(seed), collections.Counter(), []
        for _ in range(1000):
            words = document(rng, style, rng.randint(50, 400)).replace(".", " ").split()
            counts.update(words)
            distinct.append(len(set(words[:50])))
        total = sum(counts.values())
        return {w: c / total for w, c in counts.items()}, sum(distinct) / len(distinct)

    plain, plain_distinct = stats("science", 1)
    bursty, bursty_distinct = stats("science-bursty", 2)
    assert set(plain) == set(bursty)
    assert 0.5 * sum(abs(plain[w] - bursty[w]) for w in plain) < 0.06  # total variation of the frequencies
    assert plain_distinct > 3 * bursty_distinct  # distinct words among a document's first 50
