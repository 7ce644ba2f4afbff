"""``cpt quickstart``: the whole method offline on a CPU, in a few minutes, on generated text.

1. generate an "upstream" and a "downstream" corpus (the same words at the same overall frequencies; downstream
   documents repeat their own words, which takes many steps to learn) and convert both to MDS;
2. pre-train a tiny GPT-NeoX on upstream (warmup, cosine decay);
3. continue it on downstream under three schedules: constant at the final pre-training LR (no
   re-warming), re-warm to the pre-training max LR, re-warm to twice that;
4. evaluate both domains in the loop and write ``summary.md`` and its figures (``cpt report``).

Every training run is ``python -m cpt.train <yaml> ...``: the same path as a GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from cpt.data import synthetic
from cpt.data.convert import convert
from cpt.io import storage
from cpt.pythia import save_tiny_pythia
from cpt.run.checkpoints import checkpoints
from cpt.run.cpu import KEEP_FREED_MEMORY
from cpt.tools import report
from cpt.tools.export import export
from cpt.tools.report import Run

KEY = "meta.pile_set_name"
UPSTREAM = {"Prose": "prose", "Science": "science"}
DOWNSTREAM = {"Prose": "prose-bursty", "Science": "science-bursty"}  # same words and frequencies, repeated
SEQ, BATCH = 64, 8
PRETRAIN_STEPS, CPT_STEPS = 300, 100  # pre-training long enough that the shared word statistics settle
MAX_LR = 5e-3
TASK = 40  # questions in the generated task
TASKS_EVERY = 4  # the task at every 4th evaluation (and the first and last): it took a third of a run's time
SCHEDULES = {  # name -> scheduler and LR for the continual phase
    "constant": ({"name": "cpt_constant", "t_warmup": "0ba"}, MAX_LR * 0.1),
    "rewarm-1x": ({"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1}, MAX_LR),
    "rewarm-2x": ({"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1}, 2 * MAX_LR),
}


def base_config(
    root: str,
    work: str,
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
                "early": {"until": "0.25dur", "interval": "2ba"},
                "at_peak": True,
                "first": True,
            },
            "run_dir": os.path.join(work, "runs"),  # local even with --s3: metrics.jsonl is also uploaded
            "num_workers": 0,
        },
        "optimizer": {"name": "adamw", "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
        "scheduler": scheduler,
        "algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}},
        "save_folder": storage.join(root, "runs", run, "checkpoints"),
        "save_interval": f"{steps}ba",
        "callbacks": {"lr_monitor": {}},
        "loggers": {},
    }


def write_config(cfg: dict, work: str) -> str:
    """``<work>/<run_name>.yaml``: what the run trains on, as a user would launch it."""
    path = os.path.join(work, f"{cfg['run_name']}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return path


_DONE = "cpt-quickstart: trained"
EXPORT = "=>"  # "<yaml>=><folder>": after training the YAML, export its newest checkpoint to the folder


def train_yamls(items: list[str], work: str, log_name: str, then: dict[int, str] | None = None) -> None:
    """Train each YAML in order with ``cpt.train``'s own entry point (the same path as a GPU run), all in one
    process: each fresh interpreter spends 7-11 s importing torch, Composer and llm-foundry. An item
    ``<yaml>=><folder>`` also exports the run's newest checkpoint to a Hugging Face folder, which a later YAML may
    start from. The output goes to ``<work>/<log_name>.log``; each finished run is announced as it ends, followed by
    ``then[n]`` after the n-th."""
    log = os.path.join(work, f"{log_name}.log")
    env = {**KEEP_FREED_MEMORY, **os.environ}  # freed memory kept (cpt.run.cpu)
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cpt.tools.quickstart", *items],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=work,
            env=env,
            text=True,
            errors="replace",
        )
        done = 0
        for line in proc.stdout:
            fh.write(line)
            if line.startswith(_DONE):
                done += 1
                print(f"  trained{line[len(_DONE) :]}", end="", flush=True)
                if (then or {}).get(done):
                    print(then[done], flush=True)
        proc.wait()
    if proc.returncode:
        with open(log, errors="replace") as fh:
            text = fh.read()
        raise RuntimeError(f"training failed (exit code {proc.returncode}); the end of {log}:\n{text[-4000:]}")


def _train_in_turn(items: list[str]) -> int:
    from cpt.train import main

    for item in items:
        path, _, out = item.partition(EXPORT)
        t0 = time.perf_counter()
        code = main([path])
        if code:
            return code
        print(f"{_DONE} {os.path.basename(path).removesuffix('.yaml')} in {time.perf_counter() - t0:.0f}s", flush=True)
        if out:
            with open(path) as fh:
                folder = yaml.safe_load(fh)["save_folder"]
            newest = checkpoints(folder)[0][1]  # ep<N>-ba<steps>: N counts passes over the data
            export(storage.join(folder, newest), out, overwrite=True)
    return 0


def make_corpora(work: str, root: str) -> None:
    """The generated upstream and downstream corpora, converted to MDS under ``<root>/data``."""
    for name, styles, seed in (("upstream", UPSTREAM, 1), ("downstream", DOWNSTREAM, 2)):
        for split, docs in (("train", 600), ("val", 60)):
            src = os.path.join(work, f"{name}-{split}.jsonl")
            synthetic.write_jsonl(src, styles, docs=docs, seed=seed * 10 + len(split), domain_key=KEY)
            convert(
                [src], storage.join(root, "data", name), split, synthetic.TOKENIZER, KEY, seq_len=SEQ, workers=1,
                progress=False,
            )  # fmt: skip


def make_task(work: str) -> str:
    """The quickstart's task: which word comes next in a downstream validation document (the gold word, or three
    words the passage does not hold). Downstream documents repeat their own words, so adapting to them pays here."""
    with open(os.path.join(work, "downstream-val.jsonl")) as fh:
        texts = [json.loads(line)["text"] for line in fh]
    return synthetic.write_task(os.path.join(work, "next-word.jsonl"), synthetic.next_word_choice(texts, TASK, seed=5))


def write_report(work: str, runs: list[Run], steps: tuple[int, int]) -> tuple[str, dict]:
    """``cpt report`` with the constant-LR run as the baseline (its figures, table and the papers' directions), and
    the set-up; returns the summary's path and the numbers."""
    path = report.report(runs, work, "upstream", "downstream", baseline="constant", overwrite=True)
    numbers = report.summarize(runs, "upstream", "downstream")
    for run in runs:
        acc = run.series(run.tasks()["next-word"])
        numbers[run.label].update(next_word_start=acc[0][2], next_word_final=acc[-1][2])
    lines = [
        "",
        "## Set-up",
        "",
        f"Pre-trained {steps[0]} steps on upstream (max LR {MAX_LR:g}, cosine to 0.1x), then {steps[1]} steps on "
        "downstream under each schedule. `next-word`: which of four words comes next in a downstream validation "
        f"document ({TASK} questions, zero-shot).",
    ]
    law, law_lines = law_check(work, [r.label for r in runs])
    with open(os.path.join(work, "law-check.json"), "w") as fh:  # beside summary.json, whose shape stays the runs'
        json.dump(law, fh, indent=2)
    with open(path, "a") as fh:
        fh.write("\n".join(lines + law_lines) + "\n")
    return path, numbers


LAW_GOAL = 0.02  # nats: the CPT law's final-loss error we aim for, and at most a quarter of the runs' spread


def law_check(work: str, labels: list[str]) -> tuple[dict, list[str]]:
    """Leave one out (``cpt predict``): the CPT law fitted on two of the continual runs predicts the third's whole
    curve, upstream and downstream, from the same pre-training; the error at the end, the mean absolute error over
    the curve, and the spread of the two fitted runs' final losses for scale."""
    from cpt.optim.law import LawError
    from cpt.tools.predict import leave_one_out

    runs = {label: os.path.join(work, "runs", f"cpt-{label}") for label in labels}
    pretrain = os.path.join(work, "runs", "pretrain")
    out, rows = {}, []
    for held in labels:
        try:
            out[held] = leave_one_out(runs, held, pretrain, ["upstream/all", "downstream/all"])
        except LawError as exc:
            out[held] = {"refused": str(exc)}
            rows.append(f"| {held} | the fit was refused: {exc} | | | | |")
            continue
        for key, r in out[held].items():
            ok = abs(r["final_error"]) <= LAW_GOAL and abs(r["final_error"]) <= r["spread"] / 4
            r["held"] = ok
            rows.append(
                f"| {held} | {key.split('/')[0]} | {r['final_error']:+.4f} | {r['mae']:.4f} | {r['spread']:.4f} | "
                f"{r['sd_end']:.2g} | {'yes' if ok else 'NO'} |"
            )
    verdicts = [r.get("held", False) for v in out.values() for r in v.values() if isinstance(r, dict)]
    lines = [
        "",
        "## The CPT law, leave one out",
        "",
        "`cpt predict` fitted on two of the runs (and the pre-training's LRs) predicts the third's whole curve. Goal: "
        f"the final-loss error within {LAW_GOAL} nats and within a quarter of the fitted runs' spread.",
        "",
        "| predicted run | domain | error at the end | mean abs. error | spread of the fitted runs' ends "
        "| the prediction's s.e. | goal |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"The goal held for {sum(verdicts)} of {len(verdicts)} predictions"
        + ("." if all(verdicts) else f"; where it did not, the law's prediction is off by more than {LAW_GOAL} nats."),
    ]
    return out, lines


def quickstart(
    work: str = "quickstart", s3: str | None = None, pretrain_steps: int = PRETRAIN_STEPS, cpt_steps: int = CPT_STEPS
) -> dict:
    """Run everything into ``work`` (data and checkpoints on ``s3`` when given); returns the summary numbers."""
    t0 = time.perf_counter()
    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    root = s3 or work
    print("1/4 generating and converting upstream and downstream text", flush=True)
    make_corpora(work, root)
    task = make_task(work)
    arch = save_tiny_pythia(os.path.join(work, "tiny-arch"), seq_len=SEQ)
    pre = base_config(
        root,
        work,
        "pretrain",
        arch,
        ["upstream"],
        MAX_LR,
        {"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1},
        pretrain_steps,
        from_scratch=True,
        eval_every=pretrain_steps,
    )
    pre["cpt"]["eval"].update(early=None, at_peak=False)  # pre-training: evaluate first and last only
    base = os.path.join(work, "pretrained")  # the pre-trained model, exported as a Hugging Face folder
    cfgs = {}
    for name, (sched, lr) in SCHEDULES.items():
        cfg = base_config(root, work, f"cpt-{name}", base, ["downstream"], lr, dict(sched), cpt_steps, False, 8)
        cfg["cpt"]["eval"]["tasks"] = {"next-word": {"path": task, "kind": "multiple_choice"}}
        cfg["cpt"]["eval"]["tasks_every"] = TASKS_EVERY
        cfgs[name] = cfg
    print("2/4 pre-training on upstream", flush=True)
    then = {1: f"3/4 continuing on downstream under {len(cfgs)} schedules"}
    items = [write_config(pre, work) + EXPORT + base, *(write_config(c, work) for c in cfgs.values())]
    train_yamls(items, work, "runs", then)
    runs = [report.load(os.path.join(c["cpt"]["run_dir"], c["run_name"]), label=n) for n, c in cfgs.items()]
    print("4/4 writing the report", flush=True)
    path, summary = write_report(work, runs, (pretrain_steps, cpt_steps))
    with open(os.path.join(work, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(path) as fh:
        print(fh.read())
    print(f"done in {time.perf_counter() - t0:.0f}s: {path}, {os.path.join(work, 'loss.png')}")
    return summary


if __name__ == "__main__":  # python -m cpt.tools.quickstart YAML...: what train_yamls runs
    sys.exit(_train_in_turn(sys.argv[1:]))
