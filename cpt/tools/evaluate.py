"""``cpt eval MODEL CONFIG [key=value ...]``: the task files of a run, scored offline by lm-evaluation-harness.

MODEL is a Hugging Face folder (an export, a Pythia step folder), a cpt checkpoint (exported on the fly; monolithic
``.pt`` or a sharded folder) or a run's save folder (every checkpoint in it, oldest first: a curve), local or
``s3://``. CONFIG is a train YAML (its ``cpt.eval.tasks``) or a YAML with a top-level ``tasks:`` in the same form,
so the offline numbers are computed on exactly the files the loop scored. lm-eval (``pip install -e '.[eval]'``)
reads them through generated task definitions: no hub, no download.

Where lm-eval and the loop (llm-foundry's ICL metrics) differ:

- ``multiple_choice``: lm-eval's ``acc`` picks the highest summed log-likelihood, ``acc_norm`` the highest per
  byte of the choice; the loop picks the lowest mean cross-entropy per token. They agree whenever every choice of a
  question has the same number of tokens; otherwise ``acc`` favours short choices and the loop does not. So
  ``cpt eval`` adds ``acc_loop``: the loop's rule, from lm-eval's per-choice log-likelihoods divided by each
  choice's token count (as lm-eval encodes it), to compare with the loop's numbers directly. ``--log-samples``
  writes every question's log-likelihoods, token counts and both picks (``samples-<task>.jsonl``).
- ``schema`` and ``language_modeling``: the same rule in both (the continuation is shared, or every token must be
  the greedy one), so the accuracies agree at 0 shots.
- Prompts: the same text (the context, then the choice or continuation with one space); few-shot examples are drawn
  by each harness's own random sampler, so few-shot numbers differ in which examples are shown.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator

import yaml
from omegaconf import DictConfig, OmegaConf

from cpt import config, model
from cpt.eval import tasks as task_files
from cpt.io import storage
from cpt.run import checkpoints
from cpt.spec import ConfigError, Task
from cpt.tools.figures import pyplot, save

METRICS = {  # kind -> the metrics reported: lm-eval's, and acc_loop (the loop's rule, computed here)
    "language_modeling": ("acc", "perplexity"),
    "multiple_choice": ("acc", "acc_norm", "acc_loop"),
    "schema": ("acc", "acc_loop"),
}


def read_tasks(path: str, overrides: list[str] | None = None) -> dict[str, Task]:
    """The tasks of a train YAML (``cpt.eval.tasks``) or of a YAML with ``tasks:``, checked like training's."""
    cfg = config.load(path, overrides)
    where = "cpt.eval.tasks" if "cpt" in cfg else "tasks"
    raw = OmegaConf.select(cfg, where)
    if not isinstance(raw, DictConfig) or not raw:
        raise ConfigError(f"{path}: no tasks (expected cpt.eval.tasks in a train YAML, or a top-level tasks:)")
    out = {}
    for name, value in raw.items():
        if not isinstance(value, DictConfig):
            raise ConfigError(f"{path}: {where}.{name} must be a mapping (path, kind, fewshot, examples)")
        try:
            out[str(name)] = config.from_mapping(Task, OmegaConf.to_container(value), f"{where}.{name}")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    config.check_tasks(out, path, where)
    return out


def task_yaml(name: str, task: Task, local: str) -> dict:
    """lm-eval's definition of a cpt task file (``cpt_<name>``), its fields read by name."""
    common = {
        "task": f"cpt_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": local}},
        "test_split": "test",
        "fewshot_split": "test",
        "num_fewshot": task.fewshot,
        "fewshot_delimiter": "\n",  # llm-foundry's example delimiter
        "metric_list": [{"metric": m} for m in METRICS[task.kind] if m != "acc_loop"],  # acc_loop: computed here
    }
    if task.kind == "language_modeling":  # the continuation carries its own leading space
        return {**common, "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "continuation",
                "target_delimiter": ""}  # fmt: skip
    if task.kind == "multiple_choice":
        return {**common, "output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
                "doc_to_target": "gold", "target_delimiter": " "}  # fmt: skip
    # schema: each option is a context; the shared continuation is scored (doc_to_text names the gold context)
    return {**common, "output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "context_options",
            "doc_to_target": "continuation", "target_delimiter": " "}  # fmt: skip


def models(spec: str, tmp: str) -> Iterator[tuple[str, int | None, str]]:
    """``(label, batch, local Hugging Face folder)`` for each model MODEL names, one at a time (an export is
    deleted before the next is written)."""
    from cpt.tools.export import export

    name = os.path.basename(spec.rstrip("/"))
    if _is_hf_folder(spec):
        folder = model.resolve_folder(spec)
        model.check_folder(folder, spec)  # no code of its own, weights, a tokenizer
        yield name, None, folder
        return
    batch = checkpoints.batch_of(name)
    found = (
        [(batch, spec)] if batch is not None else [(b, storage.join(spec, n)) for b, n in checkpoints.checkpoints(spec)]
    )
    if not found:
        raise FileNotFoundError(f"{spec}: not a Hugging Face folder (no config.json), a checkpoint or a save folder "
                                "holding checkpoints")  # fmt: skip
    for b, ckpt in sorted(found):
        out = os.path.join(tmp, f"ba{b}")
        export(ckpt, out, overwrite=True)
        yield os.path.basename(ckpt.rstrip("/")), b, out
        shutil.rmtree(out, ignore_errors=True)


def _is_hf_folder(spec: str) -> bool:
    if storage.is_s3(spec):
        return storage.exists(storage.join(spec, "config.json"))
    return os.path.isfile(os.path.join(spec, "config.json"))


def evaluate(
    spec: str,
    tasks: dict[str, Task],
    out: str,
    device: str | None = None,
    batch_size: int = 8,
    budget: bool = False,
    overwrite: bool = False,
    log_samples: bool = False,
) -> dict:
    """Score every model MODEL names on every task; writes ``eval.json``, ``eval.md`` and, for several checkpoints,
    ``eval.png`` into ``out`` (local or ``s3://``). ``budget``: each task's first ``examples`` only, as in the loop."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, dict] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        storage.Destination(out, "cpt eval --out", overwrite, files=OUTPUTS + _sample_files(tasks)) as local_out,
    ):
        files = task_files.prepare(tasks)  # checked; s3:// files fetched into the cache
        defs = os.path.join(tmp, "lm-eval-tasks")
        os.makedirs(defs)
        for name, task in tasks.items():
            path = files[name]
            if budget and task.examples is not None:
                path = _first(path, task.examples, os.path.join(tmp, f"{name}-first.jsonl"))
            with open(os.path.join(defs, f"cpt_{name}.yaml"), "w") as fh:
                yaml.safe_dump(task_yaml(name, task, path), fh, sort_keys=False)
        manager = TaskManager(include_path=defs, include_defaults=False)
        for label, batch, folder in models(spec, os.path.join(tmp, "models")):
            print(f"evaluating {label} on {', '.join(tasks)}", flush=True)
            lm = HFLM(pretrained=folder, device=device, batch_size=batch_size, trust_remote_code=False)
            res = simple_evaluate(model=lm, tasks=[f"cpt_{n}" for n in tasks], task_manager=manager,
                                  bootstrap_iters=1000, log_samples=True)  # fmt: skip
            scores = {}
            for n, task in tasks.items():
                scores[n] = _metrics(res["results"][f"cpt_{n}"])
                if task.kind != "language_modeling":
                    picks = loop_picks(lm, res["samples"][f"cpt_{n}"])
                    scores[n]["acc_loop"] = sum(p["loop_correct"] for p in picks) / max(1, len(picks))
                    if log_samples:
                        _append_samples(os.path.join(local_out, f"samples-{n}.jsonl"), label, picks)
            results[label] = {"batch": batch, "tasks": scores}
            del lm
        _write(results, tasks, local_out, spec)
    return results


OUTPUTS = ["eval.json", "eval.md", "eval.png"]


def _sample_files(tasks: dict[str, Task]) -> list[str]:
    return [f"samples-{n}.jsonl" for n in tasks]


def loop_picks(lm, samples: list[dict]) -> list[dict]:
    """Per question of a choice task: lm-eval's per-choice log-likelihoods, each choice's token count as lm-eval
    encodes it, lm-eval's pick (highest sum) and the loop's (lowest mean cross-entropy per token)."""
    out = []
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        tokens = [len(lm._encode_pair(ctx, cont)[1]) for ctx, cont in s["arguments"]]
        mean = [ll / max(1, n) for ll, n in zip(lls, tokens)]
        gold = int(s["doc"]["gold"])  # both kinds name the right choice by its index
        summed_pick, loop_pick = max(range(len(lls)), key=lls.__getitem__), max(range(len(mean)), key=mean.__getitem__)
        out.append({
            "doc": s["doc_id"], "gold": gold, "loglikelihoods": lls, "tokens": tokens, "acc_pick": summed_pick,
            "loop_pick": loop_pick, "acc_correct": summed_pick == gold, "loop_correct": loop_pick == gold,
        })  # fmt: skip
    return out


def _append_samples(path: str, label: str, picks: list[dict]) -> None:
    with open(path, "a") as fh:
        fh.writelines(json.dumps({"model": label, **p}) + "\n" for p in picks)


def _first(path: str, n: int, out: str) -> str:
    with open(path, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        dst.writelines(line for _, line in zip(range(n), (x for x in src if x.strip())))
    return out


def _metrics(raw: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": ..., "acc_stderr,none": ...}`` as ``{"acc": ..., "acc_stderr": ...}``."""
    return {k.partition(",")[0]: float(v) for k, v in raw.items() if isinstance(v, int | float) and "," in k}


def _write(results: dict, tasks: dict[str, Task], out: str, spec: str) -> None:
    with open(os.path.join(out, "eval.json"), "w") as fh:
        json.dump({"model": spec, "results": results}, fh, indent=2)
    cols = [(n, m) for n, t in tasks.items() for m in METRICS[t.kind]]
    lines = [
        f"# cpt eval: {spec}",
        "",
        "lm-evaluation-harness on cpt's task files (zero-shot unless the task sets fewshot); ± one standard error.",
        "",
        "| model | batch | " + " | ".join(f"{n} {m}" for n, m in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for label, r in results.items():
        cells = []
        for n, m in cols:
            v, se = r["tasks"][n].get(m), r["tasks"][n].get(f"{m}_stderr")
            cells.append(
                "-" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else "")
            )
        lines.append(f"| {label} | {'-' if r['batch'] is None else r['batch']} | " + " | ".join(cells) + " |")
    curve = [r for r in results.values() if r["batch"] is not None]
    if len(curve) > 1:
        _png(results, tasks, os.path.join(out, "eval.png"))
        lines += ["", "![accuracy against batches](eval.png)"]
    with open(os.path.join(out, "eval.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _png(results: dict, tasks: dict[str, Task], path: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    points = sorted((r["batch"], r) for r in results.values() if r["batch"] is not None)
    for name in tasks:
        ax.plot([b for b, _ in points], [r["tasks"][name]["acc"] for _, r in points], marker=".", label=name)
    ax.set(title="task accuracy (lm-eval acc) by checkpoint", xlabel="batch", ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
