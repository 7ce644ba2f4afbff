"""The README's workflow, command by command, at toy scale against the loopback S3 server.

``s3://my-bucket`` becomes the test bucket, the Pythia step folder is a tiny GPT-NeoX uploaded where the
README puts it, and the raw corpora are generated text in the corpora's formats. Commands that need the
internet, a GPU cluster or Docker (``EXTERNAL``) are replaced by their offline equivalent, named below.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import prewarmed
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# not runnable here: the set-up (CI runs it), the hub, the AWS CLI (boto3 below), Docker (tests/test_docker.py)
EXTERNAL = ("python3 -m venv", ".venv/bin/python -m pytest", "huggingface-cli ", "aws s3 sync", "docker ")


def write_law_runs(root: Path, *runs: tuple[str, float]) -> None:
    """Run folders whose ``metrics.jsonl`` hold 2,000 batches' LRs (1% warmup, cosine to 0.1x) and the losses the CPT
    law gives after Pythia's pre-training, every 50 batches, for ``pile`` and ``slimpajama``."""
    import numpy as np

    from cpt.optim import law
    from cpt.tools.predict import pretrain_lrs

    pre = law.Pretrain.of(pretrain_lrs(str(ROOT / "yamls" / "pretrain" / "pythia.yaml")))
    n = np.arange(2000)
    shape = np.where(n < 20, n / 20, 0.1 + 0.45 * (1 + np.cos(np.pi * (n - 20) / 1980)))
    params = {"pile": [2.0, 0.5, 0.3, 20.0, 0.2, 50.0, 0.6], "slimpajama": [2.2, 0.5, 0.3, 20.0, -0.3, 50.0, 0.6]}
    for name, lr in runs:
        lrs = lr * shape
        evals = np.arange(0, 2001, 50)
        a = law.areas(lrs, evals, pre)
        rows = [{"batch": int(b), "lr-DecoupledAdamW/group0": float(v)} for b, v in enumerate([*lrs, lrs[-1]])]
        for dataset, p in params.items():
            for b, loss in zip(evals, law.predict(np.array(p), a)):
                rows.append({"batch": int(b), f"metrics/eval/{dataset}/all/LanguageCrossEntropy": float(loss)})
        (root / name).mkdir(parents=True)
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def readme_commands() -> list[str]:
    """Every command in the README's ``bash`` blocks, continuations joined and comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(re.sub(r"\s+", " ", line))
    return commands


def cpt(args: list[str], cwd: Path) -> str:
    """``cpt ARGS``: ``python -m cpt.cli ARGS``, forked from the prewarmed server (``tests/prewarmed.py``)."""
    code, out = prewarmed.run(["-m", "cpt.cli", *args], cwd=str(cwd), env=dict(os.environ))
    assert code == 0, f"cpt {shlex.join(args)}\n{out[-6000:]}"
    return out


def test_every_readme_command_is_handled():
    handled = ("python convert/", "cpt schedule", "cpt sweep", "composer -n", "cpt train", "cpt report", "cpt export")
    handled += ("cpt anneal", "cpt average", "cpt eval", "cpt predict")
    for cmd in readme_commands():
        assert cmd.startswith(handled + EXTERNAL), f"README command not exercised by tests/test_readme.py: {cmd}"


@pytest.mark.slow
def test_readme_workflow(tmp_path, s3_bucket):
    import zstandard
    from test_tasks import write_hub_rows

    from cpt.data import synthetic
    from cpt.data.convert import DOMAIN_KEYS
    from cpt.io import storage
    from cpt.pythia import save_tiny_pythia

    bucket = s3_bucket
    # "huggingface-cli download ... && aws s3 sync ...": a Pythia-shaped folder in the README's place
    step = save_tiny_pythia(str(tmp_path / "pythia-410m" / "step143000"), seq_len=2048)
    for f in sorted(Path(step).iterdir()):
        storage.upload_file(str(f), f"{bucket}/pythia/pythia-410m/step143000/{f.name}")
    # the raw corpora, in their formats and places
    zst = zstandard.ZstdCompressor()
    slim = {  # the seven SlimPajama domains: the paper's eval blend names them all
        "RedPajamaCommonCrawl": "prose",
        "RedPajamaC4": "prose",
        "RedPajamaGithub": "code",
        "RedPajamaBook": "prose",
        "RedPajamaArXiv": "science",
        "RedPajamaWikipedia": "science",
        "RedPajamaStackExchange": "code",
    }
    src = tmp_path / "slim.jsonl"
    synthetic.write_jsonl(src, slim, docs=90, seed=1, domain_key=DOMAIN_KEYS["slimpajama"])
    raw = f"{bucket}/raw/slimpajama/train/chunk1/example_train_0.jsonl.zst"
    storage.write_bytes(raw, zst.compress(src.read_bytes()))
    for chunk in (1, 2):  # the validation split, converted by the README's Ray command: two files, two tasks
        synthetic.write_jsonl(src, slim, docs=70, seed=1 + chunk, domain_key=DOMAIN_KEYS["slimpajama"])
        raw = f"{bucket}/raw/slimpajama/validation/chunk{chunk}/example_holdout_0.jsonl.zst"
        storage.write_bytes(raw, zst.compress(src.read_bytes()))
    pile_val = tmp_path / "pile-val.jsonl"
    pile = {"Pile-CC": "prose", "Github": "code"}
    synthetic.write_jsonl(pile_val, pile, docs=40, seed=3, domain_key=DOMAIN_KEYS["pile"])
    pile_zst = tmp_path / "val.jsonl.zst"
    pile_zst.write_bytes(zst.compress(pile_val.read_bytes()))
    # a finished tiny run for `cpt report` and `cpt export`
    domains = {"upstream": {"Pile-CC": "prose"}, "downstream": {"Github": "code"}}
    project = synthetic.tiny_project(tmp_path / "tiny", domains, {"train": 40, "val": 10})

    # two short runs for `cpt predict fit`: every batch's LR and an evaluation every 50, by the law itself
    short = ("pythia-410m-cpt-warm1-lr1.5e-4", 1.5e-4), ("pythia-410m-cpt-warm1-lr6e-4", 6e-4)
    write_law_runs(tmp_path / "runs", *short)

    subs = {
        "s3://my-bucket/runs/pythia-410m-cpt-warm1-lr6e-4/checkpoints": f"{bucket}/runs/my-run/checkpoints",
        "runs/pythia-410m-cpt-warm1-lr3e-4": str(tmp_path / "runs" / "my-run"),
        "ep0-ba131296-rank0.pt": "ep0-ba8-rank0.pt",
        "s3://my-bucket": bucket,
        "/data/pile/val.jsonl.zst": str(pile_zst),
        "--ray-address auto": "",  # no cluster here: the driver starts a Ray of its own
        # "where the hub is reachable": the datasets' rows as the hub serves them, saved beforehand
        "convert/tasks.py --out": f"convert/tasks.py --source {write_hub_rows(tmp_path / 'hub')} --out",
    }
    done = []
    for cmd in readme_commands():
        if cmd.startswith(EXTERNAL):
            continue
        for old, new in subs.items():
            cmd = cmd.replace(old, new)
        argv = shlex.split(cmd)
        argv = [str(ROOT / a) if (ROOT / a).exists() and "/" in a else a for a in argv]  # repo paths, from tmp
        if argv[0] == "python":  # forked from the prewarmed server, as the cpt commands
            code, out = prewarmed.run(argv[1:], cwd=str(tmp_path), env=dict(os.environ))
            assert code == 0, f"{cmd}\n{out[-6000:]}"
        elif argv[0] == "composer":  # -n 8 needs 8 GPUs: expand the same config as 8 ranks would, and stop there
            from cpt import config
            from cpt.run.plan import Plan

            i = argv.index("-m") + 2
            os.environ["WORLD_SIZE"] = "8"
            try:
                out = Plan.from_config(config.load(argv[i], argv[i + 1 :]), argv[i]).to_foundry()
            finally:
                del os.environ["WORLD_SIZE"]
            assert out.model.pretrained and "load_path" not in out  # base weights only: a new stage
        elif argv[:2] == ["cpt", "train"]:
            args = [
                f"variables.data={project / 'data'}",
                f"variables.model={project / 'model'}",
                "variables.run_name=my-run",
                f"variables.save_folder={bucket}/runs/my-run/checkpoints",
                f"cpt.run_dir={tmp_path / 'runs'}",
                "cpt.num_workers=0",
                "max_duration=8ba",
            ]
            cpt([*argv[1:], *args], tmp_path)
        else:
            cpt(argv[1:], tmp_path)
        done.append(argv[0] if argv[0] != "cpt" else f"cpt {argv[1]}")

    assert done.count("python") == 4 and "composer" in done and {"cpt report", "cpt export"} <= set(done)
    assert done.count("cpt predict") == 3 and (tmp_path / "predicted.csv").is_file()
    assert (tmp_path / "law.json").is_file() and (tmp_path / "front.png").is_file()
    assert done.count("cpt eval") == 2 and storage.exists(f"{bucket}/tasks/hellaswag.jsonl")
    for out in ("eval-final", "eval-curve"):
        assert (tmp_path / out / "eval.json").is_file(), out
    assert {"cpt anneal", "cpt average"} <= set(done)
    assert len(list((tmp_path / "branches").glob("my-run-anneal8-1-sqrt-*ba.yaml"))) == 1
    assert (tmp_path / "averaged-model" / "model.safetensors").is_file()
    assert storage.exists(f"{bucket}/data/slimpajama/train/manifest.json")
    assert len(json.loads(storage.read_bytes(f"{bucket}/data/slimpajama/val/manifest.json"))["inputs"]) == 2
    assert storage.exists(f"{bucket}/data/pile/val/manifest.json")
    for f in ("lr.png", "lr.csv", "cmp.png", "warmup.png", "report/summary.md", "pythia-410m-cpt/config.json"):
        assert (tmp_path / f).is_file(), f
    assert len(list((tmp_path / "sweeps" / "replay").glob("*.yaml"))) >= 5
