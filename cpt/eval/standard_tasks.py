"""The follow-up paper's zero-shot tasks, from their Hugging Face datasets to cpt's task format, once.

Run ``python convert/tasks.py --out s3://my-bucket/tasks`` where the Hugging Face hub is reachable (a laptop, a
login node); training and ``cpt eval`` then read the files from the bucket and never touch the hub. Offline,
``--source DIR`` reads ``DIR/<task>.jsonl``: the dataset's rows as the hub serves them (``Dataset.to_json``).

Prompts follow lm-evaluation-harness's own task definitions (HellaSwag's cleaning, "Question: ...\\nAnswer:" for
ARC and PIQA, WinoGrande's partial scoring, LAMBADA's last word), so ``cpt eval``'s numbers compare with
papers that used lm-eval, and the in-loop numbers are scored on the same text.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable

from cpt.io import storage


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_clean(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


def arc(row: dict) -> dict:
    return {
        "query": f"Question: {row['question']}\nAnswer:",
        "choices": list(row["choices"]["text"]),
        "gold": list(row["choices"]["label"]).index(row["answerKey"]),
    }


def piqa(row: dict) -> dict:
    return {
        "query": f"Question: {row['goal']}\nAnswer:",
        "choices": [row["sol1"], row["sol2"]],
        "gold": int(row["label"]),
    }


def openbookqa(row: dict) -> dict:
    return {
        "query": row["question_stem"],
        "choices": list(row["choices"]["text"]),
        "gold": list(row["choices"]["label"]).index(row["answerKey"].strip()),
    }


def winogrande(row: dict) -> dict:
    """The blank filled by each option is the context; what follows the blank is scored (partial scoring)."""
    idx = row["sentence"].index("_")
    return {
        "context_options": [row["sentence"][:idx] + row[f"option{i}"] for i in (1, 2)],
        "continuation": row["sentence"][idx + 1 :].strip(),
        "gold": int(row["answer"]) - 1,
    }


def lambada(row: dict) -> dict:
    context, word = row["text"].rsplit(" ", 1)
    return {"context": context, "continuation": " " + word}


# name -> (hub dataset, its config, split, converter, kind)
TASKS: dict[str, tuple[str, str | None, str, Callable[[dict], dict], str]] = {
    "hellaswag": ("Rowan/hellaswag", None, "validation", hellaswag, "multiple_choice"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", arc, "multiple_choice"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", arc, "multiple_choice"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", winogrande, "schema"),
    "piqa": ("baber/piqa", None, "validation", piqa, "multiple_choice"),
    "openbookqa": ("allenai/openbookqa", "main", "test", openbookqa, "multiple_choice"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test", lambada, "language_modeling"),
}


def _rows(name: str, source: str | None) -> Iterable[dict]:
    path, cfg, split, _, _ = TASKS[name]
    if source is not None:
        local = os.path.join(source, f"{name}.jsonl")
        with open(local, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{local}:{number}: not valid JSON ({exc.msg})") from None
        return
    from datasets import load_dataset  # the hub: only here, once

    yield from load_dataset(path, cfg, split=split)


def convert(out: str, names: list[str], source: str | None = None) -> dict[str, int]:
    """Write ``<out>/<task>.jsonl`` (local or ``s3://``) for each task; returns the examples written per task. A row
    the converter cannot read stops it, naming the task and the row."""
    from cpt.eval.tasks import check_file

    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            local = os.path.join(tmp, f"{name}.jsonl")
            with open(local, "w", encoding="utf-8") as fh:
                for i, row in enumerate(_rows(name, source)):
                    try:
                        fh.write(json.dumps(TASKS[name][3](row)) + "\n")
                    except (KeyError, ValueError, TypeError, AttributeError) as exc:
                        raise ValueError(f"{name}: row {i}: cannot convert ({exc!r})") from None
            counts[name] = check_file(local, TASKS[name][4], shown=f"{name} as converted")
            if storage.is_s3(out):
                storage.upload_file(local, storage.join(out, f"{name}.jsonl"))
            else:
                os.makedirs(out, exist_ok=True)
                os.replace(local, os.path.join(out, f"{name}.jsonl"))
            print(f"{name}: {counts[name]} examples -> {storage.join(out, f'{name}.jsonl')}", flush=True)
    return counts
