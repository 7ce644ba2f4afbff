"""``cpt report RUN [RUN ...]``: the papers' figures and a Markdown summary from runs' ``metrics.jsonl``.

A run is a folder holding ``metrics.jsonl`` (``runs/<name>/`` or the run's ``s3://`` save folder) or the file
itself. A resumed run logs some batches twice; the last value logged for a batch wins, so no point is drawn
twice. A run still going is drawn up to its last logged batch.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

from cpt.eval.tasks import PREFIX as TASKS
from cpt.io import storage, untrusted
from cpt.tools.figures import pyplot, save, token_axis

CE = "LanguageCrossEntropy"
log = logging.getLogger(__name__)
EARLY = 0.25  # "at first": each run's first quarter (from batch 2: batches 0 and 1 of a re-warm train at LR 0)


@dataclass
class Run:
    label: str
    rows: dict[int, dict]  # batch -> every metric logged at that batch (last value wins)

    def series(self, key: str) -> list[tuple[int, int, float]]:
        """``(batch, tokens, value)`` for every batch that logged ``key``, in order."""
        return [(b, r.get("tokens", 0), r[key]) for b, r in sorted(self.rows.items()) if r.get(key) is not None]

    def datasets(self) -> list[str]:
        keys = {k for r in self.rows.values() for k in r}
        return sorted({k.split("/")[2] for k in keys if k.startswith("metrics/eval/") and k.endswith(f"/all/{CE}")})

    def tasks(self) -> dict[str, str]:
        """``{task: its accuracy key}`` (``cpt.eval.tasks``'s metric names)."""
        keys = {k for r in self.rows.values() for k in r}
        return {k[len(TASKS) :].split("/")[0]: k for k in sorted(keys) if k.startswith(TASKS) and "Accuracy" in k}

    @property
    def last_batch(self) -> int:
        return max(self.rows, default=0)

    def domains(self, dataset: str) -> list[str]:
        keys = {k for r in self.rows.values() for k in r}
        prefix = f"metrics/eval/{dataset}/"
        return sorted({k[len(prefix) :].split("/")[0] for k in keys if k.startswith(prefix) and k.endswith(CE)})


def load(run: str, label: str | None = None) -> Run:
    """A run's ``metrics.jsonl`` read back as untrusted (``cpt.io.untrusted.jsonl``): every row an object with an
    integer ``batch`` and numbers (or null), else ``ValueError`` naming ``file:line``. A partial last line (a run
    killed mid-write) is dropped."""
    path = run if run.endswith(".jsonl") else storage.join(run, "metrics.jsonl")
    rows: dict[int, dict] = {}
    try:
        for n, row in untrusted.jsonl(path, "metrics.jsonl", tolerate_last=True):
            batch = row.get("batch")
            if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
                raise ValueError(f"{path}:{n}: 'batch' must be a non-negative integer")
            for key, value in row.items():
                if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                    raise ValueError(f"{path}:{n}: {str(key)[:80]!r} must be a number or null")
            rows.setdefault(batch, {}).update(row)
    except storage.StorageError as exc:
        raise FileNotFoundError(f"no metrics for run {run}: {exc}") from exc
    name = label or os.path.basename(os.path.dirname(path).rstrip("/")) or path
    if name == "checkpoints":  # an s3 save folder: runs/<name>/checkpoints
        name = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return Run(name, rows)


def pick_pair(runs: list[Run], upstream: str | None, downstream: str | None) -> tuple[str, str]:
    found = sorted(set().union(*(r.datasets() for r in runs)))
    if upstream and downstream:
        return upstream, downstream
    for up, down in (("pile", "slimpajama"), ("upstream", "downstream")):
        if up in found and down in found:
            return up, down
    if len(found) == 2:
        return found[0], found[1]
    raise ValueError(f"name the upstream and downstream datasets (--upstream/--downstream); the runs log {found}")


def families(runs: list[Run]) -> dict[str, str]:
    """``{branch label: trunk label}`` for runs named as ``cpt anneal`` names branches (``<trunk>-anneal<B>-...``)."""
    labels = {r.label for r in runs}
    out = {}
    for run in runs:
        trunk, sep, _ = run.label.rpartition("-anneal")
        if sep and trunk in labels:
            out[run.label] = trunk
    return out


def _family_style(runs: list[Run]) -> dict[str, dict]:
    """Line styles: a branch in its trunk's colour, each branch of one trunk with a dash pattern and marker of its
    own (two branches are never drawn alike); other runs in colours of their own."""
    branch_of, styles, palette = families(runs), {}, iter(f"C{i}" for i in range(1000))
    for run in runs:
        if run.label not in branch_of:
            styles[run.label] = {"color": next(palette), "ls": "-"}
    seen: dict[str, int] = {}
    for run in runs:
        if run.label in branch_of:
            trunk = branch_of[run.label]
            i = seen[trunk] = seen.get(trunk, -1) + 1
            dash, marker = BRANCH_DASHES[i % len(BRANCH_DASHES)], BRANCH_MARKERS[i % len(BRANCH_MARKERS)]
            styles[run.label] = {"color": styles[trunk]["color"], "ls": dash, "marker": marker}
    return styles


BRANCH_DASHES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2))]
BRANCH_MARKERS = ["v", "s", "^", "D", "x"]


def branch_point(label: str) -> int | None:
    """The trunk's batch a branch leaves at, from its name (``<trunk>-anneal<B>-...``)."""
    m = re.search(r"-anneal(\d+)-", label)
    return int(m.group(1)) if m else None


def _with_trunk(run: Run, key: str, by_label: dict[str, Run], branch_of: dict[str, str]):
    """``run.series(key)``; a branch's starts at its trunk's last point at or before the batch it leaves at, so
    the curve joins the trunk's."""
    s = run.series(key)
    trunk = by_label.get(branch_of.get(run.label, ""))
    if trunk is None or not s:
        return s
    leaves = min(branch_point(run.label) or s[0][0], s[0][0])
    before = [p for p in trunk.series(key) if p[0] <= leaves]
    return ([before[-1]] if before and before[-1][0] < s[0][0] else []) + s


def lr_key(run: Run) -> str | None:
    keys = sorted({k for r in run.rows.values() for k in r if k.startswith("lr-")})
    return keys[0] if keys else None


FILES = ["summary.md", "loss.png", "lr.png", "forgetting.png", "tasks.png", "families.png"]  # what a report writes


def report(
    runs: list[Run],
    out: str,
    upstream: str | None = None,
    downstream: str | None = None,
    baseline: str | None = None,
    early: float = EARLY,
    overwrite: bool = False,
    law: dict | None = None,
) -> str:
    """Write ``loss.png``, ``lr.png``, ``forgetting.png``, ``tasks.png`` (when tasks were evaluated) and
    ``summary.md`` into ``out`` (local or ``s3://``); with ``baseline`` (the run without re-warming), the papers'
    directions checked; with ``law`` (``cpt.tools.predict.overlay``: per run and dataset, the CPT law's loss after
    each batch), each run's predicted curve drawn dashed over its measured one. Returns the summary's path."""
    if baseline is not None and baseline not in {r.label for r in runs}:
        raise ValueError(f"--baseline {baseline!r} is not one of the runs ({', '.join(r.label for r in runs)})")
    if not 0 < early <= 1:
        raise ValueError(f"--early {early} must be a fraction of each run in (0, 1]")
    with storage.Destination(out, "cpt report --out", overwrite, files=FILES) as local:
        _write(runs, local, upstream, downstream, baseline, early, law)
    return storage.join(out, "summary.md")


def summarize(runs: list[Run], up: str, down: str, early: float = EARLY) -> dict[str, dict[str, float]]:
    """Per run with both datasets: start, the highest loss in its first ``early`` of batches (its start included,
    so the peak is never below it) and the end, upstream and downstream; forgetting (upstream end - start) and
    adaptation (downstream start - end)."""
    out = {}
    for run in runs:
        su, sd = (run.series(f"metrics/eval/{ds}/all/{CE}") for ds in (up, down))
        if not su or not sd:
            continue
        first = su[0][0]
        window = range(first, first + int((run.last_batch - first) * early) + 1)
        v = {"last_batch": su[-1][0]}
        for name, s in (("upstream", su), ("downstream", sd)):
            early_values = [x for b, _, x in s if b in window] or [s[0][2]]
            v.update({f"{name}_start": s[0][2], f"{name}_early_max": max(early_values), f"{name}_final": s[-1][2]})
        v["forgetting"] = v["upstream_final"] - v["upstream_start"]
        v["adaptation"] = v["downstream_start"] - v["downstream_final"]
        out[run.label] = v
    return out


def early_cadence(run: Run, up: str, early: float = EARLY) -> tuple[int, ...]:
    """The batches (after the run's first) at which the run was evaluated in its first ``early``."""
    s = run.series(f"metrics/eval/{up}/all/{CE}")
    if not s:
        return ()
    first = s[0][0]
    end = first + int((run.last_batch - first) * early)
    return tuple(b - first for b, _, _ in s if first < b <= end)


def _cadence_text(offsets: tuple[int, ...]) -> str:
    steps = {b - a for a, b in zip((0, *offsets), offsets)}
    if len(steps) == 1 and offsets:
        return f"every {steps.pop()} batch(es) to +{offsets[-1]}"
    return "at +" + ", +".join(map(str, offsets[:12])) + (" ..." if len(offsets) > 12 else "") if offsets else "none"


def max_lr(run: Run) -> float | None:
    key = lr_key(run)
    return max(v for _, _, v in run.series(key)) if key else None


def directions(numbers: dict[str, dict], baseline: str, lrs: dict[str, float | None]) -> dict[str, bool | None]:
    """The papers' six directions on measured numbers: ``None`` where the runs cannot tell (no re-warmed run, or
    fewer than two distinct max LRs)."""
    base = numbers.get(baseline)
    warm = {k: v for k, v in numbers.items() if k != baseline}
    by_lr = sorted((lrs[k], k) for k in warm if lrs.get(k) is not None)
    ordered = [warm[k] for _, k in by_lr] if len({lr for lr, _ in by_lr}) == len(by_lr) > 1 else None

    def rising(values: list[float]) -> bool:
        return all(a < b for a, b in zip(values, values[1:]))

    def every(pred) -> bool | None:
        return all(pred(v) for v in warm.values()) if warm else None

    def rise(v: dict, ds: str) -> float:
        return v[f"{ds}_early_max"] - v[f"{ds}_start"]

    def beyond(ds: str):  # the re-warmed runs rise at first, more than the baseline itself does
        return every(lambda v: rise(v, ds) > (max(0.0, rise(base, ds)) if base else 0.0))

    return {
        f"re-warming raises the upstream loss at first, beyond {baseline}'s own rise": beyond("upstream"),
        f"re-warming raises the downstream loss at first, beyond {baseline}'s own rise": beyond("downstream"),
        "the higher max LR forgets more upstream": rising([v["forgetting"] for v in ordered]) if ordered else None,
        "the higher max LR learns downstream better": (
            rising([-v["downstream_final"] for v in ordered]) if ordered else None
        ),
        f"no re-warming ({baseline}) forgets least": (
            base["forgetting"] < min(v["forgetting"] for v in warm.values()) if base and warm else None
        ),
        f"no re-warming ({baseline}) adapts least": (
            base["adaptation"] < min(v["adaptation"] for v in warm.values()) if base and warm else None
        ),
    }


@dataclass
class _Canvas:
    """What every figure of a report shares: the runs, their styles and families, the token axis."""

    runs: list[Run]
    up: str
    down: str
    styles: dict
    branch_of: dict[str, str]
    by_label: dict[str, Run]
    scale: float
    xlabel: str
    predicted: dict = field(default_factory=dict)  # label -> {dataset: (tokens, the law's losses)}

    def style(self, label: str) -> dict:
        """A run's line style, points marked (a branch with its own marker)."""
        return {"marker": ".", **self.styles[label]}

    def series(self, run: Run, key: str) -> tuple[list[float], list[float]]:
        """A run's ``key`` against tokens (a branch from its trunk's last point before it)."""
        s = _with_trunk(run, key, self.by_label, self.branch_of)
        return [t / self.scale for _, t, _ in s], [v for _, _, v in s]


ALL = "metrics/eval/{}/all/" + CE


def _loss_png(c: _Canvas, path: str) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for run in c.runs:
        for ax, ds in zip(axes, (c.up, c.down)):
            line = ax.plot(*c.series(run, ALL.format(ds)), label=run.label, **c.style(run.label))[0]
            if ds in c.predicted.get(run.label, {}):
                x, y = c.predicted[run.label][ds]
                ax.plot(x, y, "--", color=line.get_color(), linewidth=0.9, label=f"{run.label} (CPT law)")
    for ax, ds, what in zip(axes, (c.up, c.down), ("upstream", "downstream")):
        ax.set(title=f"{what} ({ds}) validation loss", xlabel=c.xlabel, ylabel="cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


def _families_png(c: _Canvas, path: str) -> None:
    """Each trunk from just before its first branch on, with its branches: where the branches differ."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, ds in zip(axes, (c.up, c.down)):
        key = ALL.format(ds)
        for trunk in sorted(set(c.branch_of.values())):
            family = [c.by_label[trunk]] + [c.by_label[b] for b, t in c.branch_of.items() if t == trunk]
            starts = [branch_point(r.label) or s[0][0] for r in family[1:] if (s := r.series(key))]
            if not starts:
                continue
            earlier = [b for b, _, _ in c.by_label[trunk].series(key) if b < min(starts)]
            first = earlier[-1] if earlier else min(starts)
            for run in family:
                s = [p for p in _with_trunk(run, key, c.by_label, c.branch_of) if p[0] >= first]
                xs, ys = [t / c.scale for _, t, _ in s], [v for _, _, v in s]
                ax.plot(xs, ys, label=run.label, **c.style(run.label))
        ax.set(title=f"{ds}: trunks and their anneal branches", xlabel=c.xlabel, ylabel="cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


def _lr_png(c: _Canvas, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    for run in c.runs:
        key = lr_key(run)
        if key:
            ax.plot(*c.series(run, key), label=run.label, **c.styles[run.label])  # the LR: no markers
    ax.set(title="learning rate", xlabel=c.xlabel, ylabel="LR")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def _forgetting_png(c: _Canvas, numbers: dict, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(5.5, 4.5))
    for label, v in numbers.items():
        du, dd = v["forgetting"], -v["adaptation"]
        ax.scatter(dd, du)
        ax.annotate(label, (dd, du), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(
        title="forgetting vs adaptation",
        xlabel=f"change in downstream loss ({c.down})",
        ylabel=f"change in upstream loss ({c.up})",
    )
    ax.grid(alpha=0.3)
    save(fig, path)


def _tasks_png(c: _Canvas, tasks: list[str], path: str) -> None:
    cols = min(3, len(tasks))
    rows_ = math.ceil(len(tasks) / cols)
    fig, axes = pyplot().subplots(rows_, cols, figsize=(4.2 * cols, 3.3 * rows_), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for run in c.runs:
            if task in run.tasks():
                ax.plot(*c.series(run, run.tasks()[task]), label=run.label, **c.style(run.label))
        ax.set(title=task, xlabel=c.xlabel, ylabel="accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    save(fig, path)


def _write(
    runs: list[Run], out: str, upstream: str | None, downstream: str | None, baseline: str | None, early: float,
    law: str | None = None,
) -> None:  # fmt: skip
    up, down = pick_pair(runs, upstream, downstream)
    os.makedirs(out, exist_ok=True)
    scale, xlabel = token_axis(max((r.get("tokens", 0) for run in runs for r in run.rows.values()), default=0))
    branch_of = families(runs)
    c = _Canvas(runs, up, down, _family_style(runs), branch_of, {r.label: r for r in runs}, scale, xlabel)
    if law:
        c.predicted = _law_curves(runs, law, scale)
    _loss_png(c, os.path.join(out, "loss.png"))
    if branch_of:
        _families_png(c, os.path.join(out, "families.png"))
    _lr_png(c, os.path.join(out, "lr.png"))
    numbers = summarize(runs, up, down, early)
    _forgetting_png(c, numbers, os.path.join(out, "forgetting.png"))
    tasks = sorted(set().union(*(r.tasks() for r in runs)))
    if tasks:
        _tasks_png(c, tasks, os.path.join(out, "tasks.png"))
    _summary_md(c, numbers, tasks, baseline, early, os.path.join(out, "summary.md"))


def _law_curves(runs: list[Run], law: dict, scale: float) -> dict:
    """``law``'s per-batch curves against tokens (each run's own tokens per batch)."""
    out = {}
    for run in runs:
        per_batch = max((r.get("tokens", 0) for r in run.rows.values()), default=0) / max(run.last_batch, 1)
        out[run.label] = {
            ds: ([b * per_batch / scale for b in range(len(y))], list(y)) for ds, y in law.get(run.label, {}).items()
        }
    return out


def _summary_md(c: _Canvas, numbers: dict, tasks: list[str], baseline: str | None, early: float, path: str) -> None:
    runs, up, down, branch_of = c.runs, c.up, c.down, c.branch_of
    lines = [
        "# cpt report",
        "",
        f"Upstream: `{up}`, downstream: `{down}`. Loss is the token-weighted cross-entropy "
        "over each validation set; a change is last evaluation minus first.",
        "",
    ]
    if branch_of:
        lines += ["Branches (dashed, in their trunk's colour in the figures):", ""]
        for branch, trunk in branch_of.items():
            lines.append(f"- `{branch}` leaves `{trunk}` at batch {branch_point(branch)}")
        lines.append("")
    sampled = {run.label: early_cadence(run, up, early) for run in runs if run.label in numbers}
    lines += [f"Evaluations in each run's first {early:.0%} (batches after its start): " + "; ".join(
        f"`{label}` {_cadence_text(offsets)}" for label, offsets in sampled.items()
    ) + ".", ""]  # fmt: skip
    if len({offsets for offsets in sampled.values()}) > 1:
        lines += [
            "**Warning:** the runs were evaluated at different batches in their first stretch, so their early peaks "
            "are sampled differently and do not compare exactly (evaluate them with one `cpt.eval.early`).",
            "",
        ]
    lines += [
        f"Loss at the start, its highest in each run's first {early:.0%} of batches (its start included) and at the "
        "end; forgetting is upstream end minus start, adaptation downstream start minus end."
        + (" Task accuracy: first evaluation -> last." if tasks else ""),
        "",
        "| run | last batch | upstream start | upstream peak early | upstream end | downstream start | "
        "downstream peak early | downstream end | forgetting | adaptation |" + "".join(f" {t} |" for t in tasks),
        "|---" * (10 + len(tasks)) + "|",
    ]
    for run in runs:
        v = numbers.get(run.label)
        if v is None:
            continue
        cells = [f"{v[f'{d}_{k}']:.4f}" for d in ("upstream", "downstream") for k in ("start", "early_max", "final")]
        cells += [f"{v['forgetting']:+.4f}", f"{v['adaptation']:+.4f}"]
        for task in tasks:
            acc = run.series(run.tasks()[task]) if task in run.tasks() else []
            cells.append(f"{acc[0][2]:.3f} -> {acc[-1][2]:.3f}" if acc else "-")
        lines.append(f"| {run.label} | {v['last_batch']} | " + " | ".join(cells) + " |")
    if baseline:
        lines += ["", f"The papers' directions, with `{baseline}` as the run without re-warming:", ""]
        for claim, ok in directions(numbers, baseline, {r.label: max_lr(r) for r in runs}).items():
            lines.append(f"- {'n/a' if ok is None else 'yes' if ok else 'NO'}: {claim}")
    for ds in (up, down):
        domains = sorted(set().union(*(r.domains(ds) for r in runs)))
        lines += [
            "",
            f"Final perplexity per domain of `{ds}`:",
            "",
            "| domain | " + " | ".join(r.label for r in runs) + " |",
            "|---" * (len(runs) + 1) + "|",
        ]
        for dom in domains:
            cells = []
            for run in runs:
                s = run.series(f"metrics/eval/{ds}/{dom}/{CE}")
                cells.append(f"{math.exp(s[-1][2]):.2f}" if s else "-")
            lines.append(f"| {dom} | " + " | ".join(cells) + " |")
    lines += ["", "![loss](loss.png)", "", "![learning rate](lr.png)", "", "![forgetting](forgetting.png)", ""]
    if tasks:
        lines += ["![task accuracy](tasks.png)", ""]
    if branch_of:
        lines += ["![trunks and their branches](families.png)", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
