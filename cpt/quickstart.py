"""``cpt quickstart``: the whole method offline on a CPU, in a few minutes, on generated text.

1. generate an "upstream" and a "downstream" corpus (different mixtures of generated styles) and convert
   both to MDS;
2. pre-train a tiny GPT-NeoX on upstream (warmup, cosine decay);
3. continue it on downstream under three schedules: constant at the final pre-training LR (no
   re-warming), re-warm to the pre-training max LR, re-warm to twice that;
4. evaluate both domains in the loop and write ``report.md`` and ``losses.png`` with the measured numbers.

Every training run is ``python -m cpt.train <yaml> ...``: the same path as a GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import yaml

from cpt import storage
from cpt.data import synthetic
from cpt.data.convert import convert
from cpt.export import export
from cpt.model import save_tiny_pythia

KEY = "meta.pile_set_name"
UPSTREAM = {"Prose": "prose", "Science": "science"}
DOWNSTREAM = {"Prose": "prose-shifted", "Science": "science-shifted"}  # same words, other frequencies
SEQ, BATCH = 64, 8
PRETRAIN_STEPS, CPT_STEPS = 120, 40
MAX_LR = 1e-3
SCHEDULES = {  # name -> scheduler and LR for the continual phase
    "constant": ({"name": "cpt_constant", "t_warmup": "0ba"}, MAX_LR * 0.1),
    "rewarm-1x": ({"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1}, MAX_LR),
    "rewarm-2x": ({"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1}, 2 * MAX_LR),
}


def base_config(
    root: str,
    run: str,
    model: str,
    train: list,
    lr: float,
    scheduler: dict,
    steps: int,
    from_scratch: bool,
    eval_every: int,
) -> dict:
    return {
        "run_name": run,
        "seed": 17,
        "max_seq_len": SEQ,
        "global_train_batch_size": BATCH,
        "device_train_microbatch_size": BATCH,
        "device_eval_batch_size": 16,
        "max_duration": f"{steps}ba",
        "precision": "fp32",
        "python_log_level": "warning",
        "console_log_interval": "1000ba",
        "progress_bar": False,
        "cpt": {
            "model": model,
            "from_scratch": from_scratch,
            "train": {name: {"path": storage.join(root, "data", name, "train"), "proportion": 1.0} for name in train},
            "eval": {
                "datasets": {d: {"path": storage.join(root, "data", d, "val")} for d in ("upstream", "downstream")},
                "tokens_per_domain": 1024,
                "interval": f"{eval_every}ba",
                "warmup_interval": "1ba",
                "at_peak": True,
                "first": True,
            },
            "run_dir": os.path.join(root if not storage.is_s3(root) else ".", "runs"),
            "num_workers": 0,
        },
        "optimizer": {"name": "adamw", "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
        "scheduler": scheduler,
        "algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}},
        "save_folder": storage.join(root, "runs", run, "checkpoints"),
        "save_interval": f"{steps}ba",
        "autoresume": True,
        "callbacks": {"lr_monitor": {}},
        "loggers": {},
    }


def _train(cfg: dict, work: str) -> list[dict]:
    path = os.path.join(work, f"{cfg['run_name']}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cpt.train", path], capture_output=True, text=True, cwd=work)
    if proc.returncode:
        raise RuntimeError(f"training {cfg['run_name']} failed:\n{proc.stderr[-4000:]}")
    print(f"  trained {cfg['run_name']} in {time.perf_counter() - t0:.0f}s", flush=True)
    metrics = os.path.join(cfg["cpt"]["run_dir"], cfg["run_name"], "metrics.jsonl")
    with open(metrics) as fh:
        return [json.loads(line) for line in fh]


@dataclass
class Curve:
    batches: list[int]
    upstream: list[float]
    downstream: list[float]


def curve(rows: list[dict]) -> Curve:
    key = "metrics/eval/{}/all/LanguageCrossEntropy"
    by_batch: dict[int, dict] = {}
    for r in rows:
        if key.format("upstream") in r:
            by_batch[r["batch"]] = r  # the last value per batch wins (a resumed run may repeat one)
    b = sorted(by_batch)
    return Curve(
        b, [by_batch[i][key.format("upstream")] for i in b], [by_batch[i][key.format("downstream")] for i in b]
    )


def summarize(curves: dict[str, Curve]) -> dict[str, dict[str, float]]:
    """Per run: start, peak during the first 10 batches, and final loss on both domains."""
    out = {}
    for name, c in curves.items():
        early = [i for i, b in enumerate(c.batches) if 2 <= b <= CPT_STEPS // 4]  # batches 0 and 1: LR 0
        out[name] = {
            "upstream_start": c.upstream[0],
            "upstream_early_max": max(c.upstream[i] for i in early),
            "upstream_final": c.upstream[-1],
            "downstream_start": c.downstream[0],
            "downstream_early_max": max(c.downstream[i] for i in early),
            "downstream_final": c.downstream[-1],
        }
        out[name]["forgetting"] = out[name]["upstream_final"] - out[name]["upstream_start"]
        out[name]["adaptation"] = out[name]["downstream_start"] - out[name]["downstream_final"]
    return out


def write_report(work: str, curves: dict[str, Curve], summary: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        axes[0].plot(c.batches, c.upstream, label=name, marker=".")
        axes[1].plot(c.batches, c.downstream, label=name, marker=".")
    for ax, title in zip(axes, ("upstream (forgetting)", "downstream (adaptation)")):
        ax.set_title(f"{title} validation loss")
        ax.set_xlabel("continual pre-training step")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(work, "losses.png"), dpi=110)
    plt.close(fig)
    lines = [
        "# cpt quickstart: re-warming a tiny GPT-NeoX",
        "",
        f"Pre-trained {PRETRAIN_STEPS} steps on upstream (max LR {MAX_LR:g}, cosine to 0.1x), then "
        f"{CPT_STEPS} steps on downstream under each schedule. Loss is token-weighted cross-entropy over "
        "each validation set, measured in the loop.",
        "",
        "| run | upstream start | upstream max (first steps) | upstream final | downstream start | "
        "downstream final | forgetting | adaptation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['upstream_start']:.4f} | {s['upstream_early_max']:.4f} | "
            f"{s['upstream_final']:.4f} | {s['downstream_start']:.4f} | {s['downstream_final']:.4f} | "
            f"{s['forgetting']:+.4f} | {s['adaptation']:+.4f} |"
        )
    lines += ["", "![losses](losses.png)", "", "What the paper reports, checked on these numbers:", ""]
    for claim, ok in checks(summary).items():
        lines.append(f"- {'yes' if ok else 'NO'}: {claim}")
    path = os.path.join(work, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def checks(s: dict) -> dict[str, bool]:
    c, r1, r2 = s["constant"], s["rewarm-1x"], s["rewarm-2x"]
    return {
        "re-warming raises the upstream loss at first": all(
            r["upstream_early_max"] > r["upstream_start"] for r in (r1, r2)
        ),
        "re-warming raises the downstream loss at first": all(
            r["downstream_early_max"] > r["downstream_start"] for r in (r1, r2)
        ),
        "the higher max LR forgets more upstream": r2["forgetting"] > r1["forgetting"],
        "the higher max LR learns downstream better": r2["downstream_final"] < r1["downstream_final"],
        "constant LR forgets least": c["forgetting"] < min(r1["forgetting"], r2["forgetting"]),
        "constant LR adapts least": c["adaptation"] < min(r1["adaptation"], r2["adaptation"]),
    }


def quickstart(work: str = "quickstart", s3: str | None = None) -> dict:
    """Run everything into ``work`` (data on ``s3`` when given); returns the summary numbers."""
    t0 = time.perf_counter()
    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    root = s3 or work
    tok = os.path.join(os.path.dirname(__file__), "assets", "tokenizer.json")
    print("1/4 generating and converting upstream and downstream text", flush=True)
    for name, styles, seed in (("upstream", UPSTREAM, 1), ("downstream", DOWNSTREAM, 2)):
        for split, docs in (("train", 600), ("val", 60)):
            src = os.path.join(work, f"{name}-{split}.jsonl")
            synthetic.write_jsonl(src, styles, docs=docs, seed=seed * 10 + len(split), domain_key=KEY)
            convert([src], storage.join(root, "data", name), split, tok, KEY, seq_len=SEQ, workers=1, progress=False)
    arch = save_tiny_pythia(os.path.join(work, "tiny-arch"), seq_len=SEQ)
    print("2/4 pre-training on upstream", flush=True)
    pre = base_config(
        root,
        "pretrain",
        arch,
        ["upstream"],
        MAX_LR,
        {"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1},
        PRETRAIN_STEPS,
        from_scratch=True,
        eval_every=PRETRAIN_STEPS,
    )
    pre["cpt"]["eval"].update(warmup_interval=None, at_peak=False)  # pre-training: evaluate first and last only
    _train(pre, work)
    base = export(
        storage.join(pre["save_folder"], f"ep0-ba{PRETRAIN_STEPS}-rank0.pt"), os.path.join(work, "pretrained")
    )
    print("3/4 continuing on downstream under three schedules", flush=True)
    curves = {}
    for name, (sched, lr) in SCHEDULES.items():
        cfg = base_config(
            root, f"cpt-{name}", base, ["downstream"], lr, dict(sched), CPT_STEPS, from_scratch=False, eval_every=4
        )
        curves[name] = curve(_train(cfg, work))
    print("4/4 writing the report", flush=True)
    summary = summarize(curves)
    report = write_report(work, curves, summary)
    with open(os.path.join(work, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(open(report).read())
    print(f"done in {time.perf_counter() - t0:.0f}s: {report}, {os.path.join(work, 'losses.png')}")
    return summary
