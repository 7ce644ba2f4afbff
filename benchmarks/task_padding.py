"""What llm-foundry's padding of task examples to ``max_seq_len`` costs, and what cpt's shorter padding saves.

    python benchmarks/task_padding.py [--seq-len 512] [--questions 200] [--steps 8]

A tiny GPT-NeoX on generated text at ``--seq-len`` tokens, one zero-shot multiple-choice task of ``--questions``
short questions (the quickstart's next-word kind), evaluated at the first and the last of ``--steps`` batches. Two
``cpt train`` runs, each in its own process: padded to ``max_seq_len`` (``icl_seq_len`` set to it, llm-foundry's
default) and cpt's default (the longest example, rounded up). Prints the seconds the task evaluations took (from the
run's own log line) and both runs' accuracies, which must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(project: Path, name: str, task: str, steps: int, *extra: str) -> tuple[float, dict[int, float]]:
    cmd = [sys.executable, "-m", "cpt.train", str(ROOT / "yamls" / "tiny-cpu.yaml"),
           f"variables.data={project / 'data'}", f"variables.model={project / 'model'}",
           f"variables.save_folder={project / name}", f"cpt.run_dir={project / 'runs'}", f"variables.run_name={name}",
           f"max_duration={steps}ba", f"save_interval={steps}ba", f"cpt.eval.interval={steps}ba", "cpt.eval.early=null",
           "cpt.num_workers=0", "python_log_level=info", task, *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=project)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    seconds = float(re.search(r"tasks ([0-9.]+) s", proc.stdout + proc.stderr).group(1))
    key = "metrics/tasks/nextword/0-shot/InContextLearningMultipleChoiceAccuracy"
    rows = [json.loads(line) for line in (project / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return seconds, {r["batch"]: r[key] for r in rows if key in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    from cpt.data import synthetic

    work = Path(tempfile.mkdtemp(prefix="cpt-padding-"))
    os.environ["CPT_CACHE"] = str(work / "cache")
    domains = {"upstream": {"Pile-CC": "prose"}, "downstream": {"Pile-CC": "prose"}}
    project = synthetic.tiny_project(work, domains, {"train": 60, "val": 20}, seq_len=args.seq_len,
                                     model_seq_len=args.seq_len)  # fmt: skip
    texts = [json.loads(line)["text"] for line in (work / "downstream-val.jsonl").read_text().splitlines()]
    path = synthetic.write_task(work / "nextword.jsonl", synthetic.next_word_choice(texts, args.questions, seed=5))
    task = f"cpt.eval.tasks={{nextword: {{path: '{path}', kind: multiple_choice}}}}"
    seq = f"max_seq_len={args.seq_len}"
    full, acc_full = run(project, "full", task, args.steps, seq, f"icl_seq_len={args.seq_len}")
    short, acc_short = run(project, "short", task, args.steps, seq)
    print(f"{args.questions} questions x 4 choices, 2 evaluations, max_seq_len {args.seq_len}:")
    print(f"  padded to max_seq_len (llm-foundry's default): tasks {full:.1f} s, accuracy {acc_full}")
    print(f"  padded to the longest (cpt's default):         tasks {short:.1f} s, accuracy {acc_short}")
    print(f"  {full / max(short, 1e-9):.1f}x less task time; accuracies equal: {acc_full == acc_short}")


if __name__ == "__main__":
    main()
