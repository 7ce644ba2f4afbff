"""Task accuracy (``cpt.eval.tasks``): JSONL files in llm-foundry's in-context-learning format, checked before
the first step and scored in the loop by llm-foundry's ICL evaluators (one implementation of scoring).

Fields per kind (one JSON object per line):

- ``language_modeling`` (LAMBADA): ``context``, ``continuation``. Correct when every token of the
  continuation is the model's greedy prediction.
- ``multiple_choice`` (HellaSwag, ARC, PIQA, OpenBookQA): ``query``, ``choices`` (a list), ``gold`` (an index).
  The choice with the lowest mean cross-entropy per token wins.
- ``schema`` (WinoGrande): ``context_options`` (a list), ``continuation``, ``gold``. The context under which the
  shared continuation has the lowest mean cross-entropy wins.

Metric names (the contract ``cpt report`` reads):
``metrics/tasks/<task>/<k>-shot/InContextLearningLMAccuracy`` (language_modeling) and
``metrics/tasks/<task>/<k>-shot/InContextLearningMultipleChoiceAccuracy`` (multiple_choice, schema).
"""

from __future__ import annotations

import json
import logging
import os

from cpt.io import storage, untrusted
from cpt.io.cache import mirror_file
from cpt.spec import ConfigError, Cpt, Task

FIELDS = {  # kind -> {field: its type}
    "language_modeling": {"context": str, "continuation": str},
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
}
METRIC = {
    "language_modeling": "InContextLearningLMAccuracy",
    "multiple_choice": "InContextLearningMultipleChoiceAccuracy",
    "schema": "InContextLearningMultipleChoiceAccuracy",
}
PREFIX = "metrics/tasks/"
log = logging.getLogger(__name__)


def label(name: str) -> str:
    return f"tasks/{name}"


def metric_name(name: str, task: Task) -> str:
    """The one name a task's accuracy is logged under."""
    return f"{PREFIX}{name}/{task.fewshot}-shot/{METRIC[task.kind]}"


def check_file(path: str, kind: str, fewshot: int = 0, shown: str | None = None) -> int:
    """Every line of a local task file against its kind; returns the number of examples. ``ValueError`` naming
    the file (``shown``) and the line."""
    shown = shown or path
    fields, n = FIELDS[kind], 0
    with open(path, "rb") as fh:
        for number, raw in untrusted.lines(fh, shown, untrusted.LINE_BYTES):  # a huge line is refused, unread
            n += _check_row(raw, f"{shown}:{number}", kind, fields)
    if n == 0:
        raise ValueError(f"{shown}: holds no example")
    if fewshot >= n:
        raise ValueError(f"{shown}: fewshot={fewshot} needs more than {fewshot} examples; it holds {n}")
    return n


def _check_row(raw: bytes, where: str, kind: str, fields: dict) -> int:
    """1 for a valid example line, 0 for a blank one; ``ValueError`` naming ``where`` otherwise."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not line.strip():
        return 0
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with {', '.join(fields)}")
    for key, tp in fields.items():
        if key not in row:
            raise ValueError(f"{where}: missing {key!r} (a {kind} task has {', '.join(fields)})")
        value = row[key]
        if not isinstance(value, tp) or isinstance(value, bool):
            raise ValueError(f"{where}: {key!r} must be a {tp.__name__}, got {value!r}"[:300])
    options = row.get("choices", row.get("context_options"))
    if options is not None:
        if len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
            raise ValueError(f"{where}: needs at least two non-empty strings as options")
        if not 0 <= row["gold"] < len(options):
            raise ValueError(f"{where}: gold={row['gold']} is not an index of its {len(options)} options")
    texts = [row[k] for k, tp in fields.items() if tp is str]
    if not all(t.strip() for t in texts):
        raise ValueError(f"{where}: an empty {' or '.join(k for k, tp in fields.items() if tp is str)}")
    return 1


def prepare(tasks: dict[str, Task]) -> dict[str, str]:
    """``{task: local JSONL}``, every file checked; an ``s3://`` file is fetched once into the cache (again only when
    its ETag changes). ``ConfigError`` naming the key, the file and the line."""
    out = {}
    for name, task in tasks.items():
        try:
            local = mirror_file(task.path, "tasks")
            if not os.path.isfile(local):
                raise ValueError(f"{task.path}: no such file")
            check_file(local, task.kind, task.fewshot, shown=task.path)
        except (ValueError, OSError, storage.StorageError) as exc:
            raise ConfigError(f"cpt.eval.tasks.{name}.path: {exc}") from exc
        out[name] = os.path.abspath(local)
    return out


def lengths(path: str, kind: str, tokenizer) -> list[int]:
    """Each example's tokens in a checked task file: its longest prompt and answer."""
    out = []
    with open(path, "rb") as fh:
        for _, raw in untrusted.lines(fh, path):
            if not raw.strip():
                continue
            row = json.loads(raw)
            if kind == "language_modeling":
                texts = [row["context"] + row["continuation"]]
            elif kind == "multiple_choice":
                texts = [row["query"] + " " + c for c in row["choices"]]
            else:
                texts = [o + " " + row["continuation"] for o in row["context_options"]]
            out.append(max(len(e.ids) for e in tokenizer.encode_batch(texts)))
    return out


PAD_MARGIN, PAD_STEP = 8, 64  # tokens: llm-foundry tokenizes context and answer apart (a few more); a round size


def padded_length(tasks: dict[str, Task], longest: dict[str, int], seq_len: int) -> int:
    """The length llm-foundry pads every task example to (``icl_seq_len``): the longest example, with a margin and
    rounded up, never above ``seq_len``. llm-foundry pads the language-modelling, multiple-choice and schema kinds
    on the right, so a shorter padding changes no logit of the example. Few-shot prompts are not measured here:
    with any ``fewshot`` the full ``seq_len`` is kept."""
    if not tasks or any(t.fewshot for t in tasks.values()) or not longest:
        return seq_len
    need = max(longest.values()) + PAD_MARGIN
    return min(seq_len, -(-need // PAD_STEP) * PAD_STEP)


def measure(tasks: dict[str, Task], files: dict[str, str], model_dir: str, seq_len: int) -> tuple[dict, dict]:
    """Per task, how many examples are longer than the run's sequence length (logged: llm-foundry cuts their
    context from the left, so a question loses its beginning) and its longest example; returns both."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not tasks or not os.path.isfile(path):
        return {}, {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    cut, longest = {}, {}
    for name, task in tasks.items():
        sizes = lengths(files[name], task.kind, tokenizer)
        cut[name], total, longest[name] = sum(n > seq_len for n in sizes), len(sizes), max(sizes, default=0)
        if cut[name]:
            log.warning(
                "cpt.eval.tasks.%s: %d of %d examples are longer than max_seq_len=%d tokens: llm-foundry cuts their "
                "context from the left", name, cut[name], total, seq_len,
            )  # fmt: skip
    return cut, longest


def icl_tasks(section: Cpt, files: dict[str, str]) -> list[dict]:
    """llm-foundry's ``icl_tasks``. The file is read in place through ``datasets``' JSON builder (llm-foundry's
    ``hf://`` branch), so llm-foundry copies nothing into the working directory."""
    return [
        {
            "label": label(name),
            "dataset_uri": "hf://json",
            "hf_loading_vars": {"data_files": files[name], "split": "train"},
            "icl_task_type": task.kind,
            "num_fewshot": [task.fewshot],
            "metric_names": [METRIC[task.kind]],
        }
        for name, task in section.eval.tasks.items()
    ]


def examples_per_label(section: Cpt) -> dict[str, int]:
    """``{evaluator label: examples per evaluation}`` for the tasks with a budget."""
    return {
        f"{label(name)}/{task.fewshot}-shot": task.examples
        for name, task in section.eval.tasks.items()
        if task.examples is not None
    }
