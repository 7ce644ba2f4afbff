"""The main job end to end on CPU: real sample -> MDS on loopback S3 -> tiny Pythia from S3 -> train with
replay and per-domain eval; every domain's logged loss equals the loss computed directly with the same weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import prewarmed
import pytest
import torch

from cpt.data import synthetic
from cpt.data.convert import DOMAIN_KEYS, convert
from cpt.io import storage
from cpt.pythia import save_tiny_pythia

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yamls" / "tiny-cpu.yaml"
SEQ = 64


def upload_folder(folder: Path, url: str) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            storage.upload_file(str(p), storage.join(url, str(p.relative_to(folder))))


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory, sample_jsonl):
    """Data and model in a fresh bucket; one training run as a subprocess, as a user would launch it."""
    import boto3

    tmp = tmp_path_factory.mktemp("train")
    bucket = "cpt-train"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    s3 = f"s3://{bucket}"
    tok = str(ROOT / "cpt" / "assets" / "tokenizer.json")
    os.environ["CPT_CACHE"] = str(tmp / "cache")
    # downstream: the real RedPajama sample (train: every document; val: every 3rd)
    lines = sample_jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    val = [line for i, line in enumerate(lines) if i % 3 == 0 or "RedPajamaBook" in line]  # the only book, too
    (tmp / "sp-val.jsonl").write_text("".join(val), encoding="utf-8")
    convert(
        [str(sample_jsonl)],
        f"{s3}/data/downstream",
        "train",
        tok,
        DOMAIN_KEYS["slimpajama"],
        seq_len=SEQ,
        workers=2,
        progress=False,
    )
    convert(
        [str(tmp / "sp-val.jsonl")],
        f"{s3}/data/downstream",
        "val",
        tok,
        DOMAIN_KEYS["slimpajama"],
        seq_len=SEQ,
        workers=1,
        progress=False,
    )
    # upstream: generated Pile-style text
    for split, n in (("train", 300), ("val", 40)):
        synthetic.write_jsonl(
            tmp / f"pile-{split}.jsonl",
            {"Pile-CC": "prose", "ArXiv": "science"},
            docs=n,
            seed=len(split),
            domain_key=DOMAIN_KEYS["pile"],
        )
        convert(
            [str(tmp / f"pile-{split}.jsonl")],
            f"{s3}/data/upstream",
            split,
            tok,
            DOMAIN_KEYS["pile"],
            seq_len=SEQ,
            workers=1,
            progress=False,
        )
    save_tiny_pythia(str(tmp / "pythia" / "step143000"))
    upload_folder(tmp / "pythia" / "step143000", f"{s3}/pythia/step143000")

    overrides = [
        f"variables.model={s3}/pythia/step143000",
        "variables.run_name=e2e",
        f"variables.save_folder={s3}/runs/e2e/checkpoints",
        f"variables.data={s3}/data",
        "cpt.train.downstream.proportion=0.9",
        "cpt.train.upstream.proportion=0.1",
        "cpt.eval.datasets.downstream.blends.paper={RedPajamaArXiv: 2.5, RedPajamaBook: 4.5, RedPajamaC4: 15.0, "
        "RedPajamaWikipedia: 4.5, RedPajamaGithub: 4.5, RedPajamaStackExchange: 2.0, RedPajamaCommonCrawl: 67.0}",
        f"cpt.run_dir={tmp / 'runs'}",
        "cpt.num_workers=0",
        "max_duration=24ba",
        "cpt.eval.tokens_per_domain=1024",
    ]
    code, log = prewarmed.run(["-m", "cpt.cli", "train", str(TINY), *overrides], cwd=str(tmp), env=dict(os.environ))
    assert code == 0, log[-5000:]
    rows = [json.loads(line) for line in (tmp / "runs" / "e2e" / "metrics.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "s3": s3, "rows": rows, "log": log}


def test_every_domain_is_logged_with_aggregates_and_blend(s3_run):
    from cpt.data import manifest as mf

    keys = {k for r in s3_run["rows"] for k in r}
    for dataset in ("upstream", "downstream"):
        m = mf.read(f"{s3_run['s3']}/data/{dataset}/val")
        slugs = [d.slug for d in m.domains.values() if d.samples]
        assert len(slugs) == (2 if dataset == "upstream" else 7)
        for slug in [*slugs, "all"]:
            for metric in ("LanguageCrossEntropy", "LanguagePerplexity"):
                assert f"metrics/eval/{dataset}/{slug}/{metric}" in keys
    assert "metrics/eval/downstream/paper/LanguageCrossEntropy" in keys
    # metrics.jsonl reached the run's S3 folder too
    assert storage.exists(f"{s3_run['s3']}/runs/e2e/checkpoints/metrics.jsonl")


def test_eval_cadence_and_lr(s3_run):
    rows = s3_run["rows"]
    evals = sorted({r["batch"] for r in rows if "metrics/eval/upstream/all/LanguageCrossEntropy" in r})
    # first, every batch during the 3-batch warmup (t_warmup 0.125dur of 24), at the peak (3), every 8, the end
    assert evals == [0, 1, 2, 3, 8, 16, 24]
    ce = {
        r["batch"]: r["metrics/eval/upstream/all/LanguageCrossEntropy"]
        for r in rows
        if "metrics/eval/upstream/all/LanguageCrossEntropy" in r
    }
    assert ce[0] == ce[1]  # batch 0 trained at LR 0
    lrs = {r["batch"]: r["lr-AdamW/group0"] for r in rows if "lr-AdamW/group0" in r}
    assert lrs[1] == pytest.approx(1e-4) and lrs[3] == pytest.approx(3e-4)  # logged after batch n: LR of batch n
    assert lrs[0] == 0.0  # batch 0's, logged before it trains: the warmup starts at 0, not at 1e-4


def _direct_losses(s3_run, dataset: str) -> dict[str, float]:
    """Cross-entropy per domain over the same samples the evaluator saw, with the final checkpoint's weights."""
    from streaming import StreamingDataset
    from transformers import GPTNeoXForCausalLM

    from cpt.data import manifest as mf

    tmp = s3_run["tmp"]
    ckpt = tmp / "final.pt"
    storage.download_file(f"{s3_run['s3']}/runs/e2e/checkpoints/ep0-ba24-rank0.pt", str(ckpt))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]["model"]
    model = GPTNeoXForCausalLM.from_pretrained(str(tmp / "pythia" / "step143000"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model.eval()
    out = {}
    m = mf.read(f"{s3_run['s3']}/data/{dataset}/val")
    budget = math.ceil(1024 / (SEQ * 8)) * 8  # tokens_per_domain -> whole eval batches of 8 samples
    for d in m.domains.values():
        if not d.samples:
            continue
        ds = StreamingDataset(
            remote=f"{s3_run['s3']}/data/{dataset}/val/{d.slug}",
            local=str(tmp / "read" / d.slug),
            shuffle=False,
            batch_size=1,
        )
        ids = torch.tensor(np.stack([ds[i]["tokens"] for i in range(min(budget, ds.num_samples))]).astype(np.int64))
        with torch.no_grad():
            logits = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        out[d.slug] = (float(loss), ids[:, 1:].numel())
    return out


@pytest.mark.parametrize("dataset", ["upstream", "downstream"])
def test_logged_loss_equals_direct_loss(s3_run, dataset):
    last = {}
    for r in s3_run["rows"]:
        if r["batch"] == 24:
            last.update(r)
    direct = _direct_losses(s3_run, dataset)
    for slug, (loss, n) in direct.items():
        assert last[f"metrics/eval/{dataset}/{slug}/LanguageCrossEntropy"] == pytest.approx(loss / n, rel=1e-4), slug
    total = sum(loss for loss, _ in direct.values()) / sum(n for _, n in direct.values())
    assert last[f"metrics/eval/{dataset}/all/LanguageCrossEntropy"] == pytest.approx(total, rel=1e-4)
    if dataset == "downstream":
        w = {
            "redpajamaarxiv": 2.5,
            "redpajamabook": 4.5,
            "redpajamac4": 15.0,
            "redpajamawikipedia": 4.5,
            "redpajamagithub": 4.5,
            "redpajamastackexchange": 2.0,
            "redpajamacommoncrawl": 67.0,
        }
        blend = sum(w[s] * direct[s][0] / direct[s][1] for s in w) / sum(w.values())
        assert last["metrics/eval/downstream/paper/LanguageCrossEntropy"] == pytest.approx(blend, rel=1e-4)


def test_a_cpu_command_line_reexecutes_once_with_freed_memory_kept():
    """``cpt.run.cpu.apply_on_cpu`` from a real command line: the process runs again with glibc's settings (read
    only at start), exactly once; with the settings already there it runs as it is."""
    from cpt.run import cpu

    if cpu.has_gpu():
        pytest.skip("a GPU machine runs as it is")
    code = (
        "import os; from cpt.run import cpu; print('start', flush=True); cpu.apply_on_cpu(); "
        "print(os.environ.get('MALLOC_TOP_PAD_'))"
    )
    plain = {k: v for k, v in os.environ.items() if k not in cpu.KEEP_FREED_MEMORY}
    out = subprocess.run([sys.executable, "-c", code], env=plain, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["start", "start", cpu.KEEP_FREED_MEMORY["MALLOC_TOP_PAD_"]]
    given = {**plain, **cpu.KEEP_FREED_MEMORY}
    out = subprocess.run([sys.executable, "-c", code], env=given, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["start", cpu.KEEP_FREED_MEMORY["MALLOC_TOP_PAD_"]]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),  # one rank keeps torch's default
        ({"LOCAL_WORLD_SIZE": "2"}, "half"),  # two ranks split the cores
        ({"LOCAL_WORLD_SIZE": "64"}, 1),  # never below one
        ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, None),  # the user's count wins
    ],
)
def test_ranks_on_one_cpu_node_split_its_cores(env, expected):
    from cpt.run import cpu

    if cpu.has_gpu():
        pytest.skip("a GPU machine keeps torch's threads")
    code = "import torch; d = torch.get_num_threads(); from cpt.run import cpu; print(d, cpu.share_cores())"
    base = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    default, got = out.stdout.split()
    want = max(1, int(default) // 2) if expected == "half" else expected
    assert got == str(want)
