"""``cpt report RUN [RUN ...]``: the papers' figures and a Markdown summary from runs' ``metrics.jsonl``.

A run is a folder holding ``metrics.jsonl`` (``runs/<name>/`` or the run's ``s3://`` save folder) or the file
itself. A resumed run logs some batches twice; the last value logged for a batch wins, so no point is drawn
twice. A run still going is drawn up to its last logged batch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from cpt.io import storage

CE = "LanguageCrossEntropy"


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

    def domains(self, dataset: str) -> list[str]:
        keys = {k for r in self.rows.values() for k in r}
        prefix = f"metrics/eval/{dataset}/"
        return sorted({k[len(prefix) :].split("/")[0] for k in keys if k.startswith(prefix) and k.endswith(CE)})


def load(run: str, label: str | None = None) -> Run:
    path = run if run.endswith(".jsonl") else storage.join(run, "metrics.jsonl")
    try:
        text = storage.read_bytes(path).decode()
    except storage.StorageError as exc:
        raise FileNotFoundError(f"no metrics for run {run}: {exc}") from exc
    rows: dict[int, dict] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(text.splitlines()):
                break  # a run killed mid-write leaves a partial last line
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        rows.setdefault(int(row["batch"]), {}).update(row)
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
    """Line styles: a branch in its trunk's colour, dashed; other runs in colours of their own."""
    branch_of, styles, palette = families(runs), {}, iter(f"C{i}" for i in range(1000))
    for run in runs:
        if run.label not in branch_of:
            styles[run.label] = {"color": next(palette), "ls": "-"}
    for run in runs:
        if run.label in branch_of:
            styles[run.label] = {"color": styles[branch_of[run.label]]["color"], "ls": "--"}
    return styles


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


def _families_png(runs, datasets, all_key, styles, branch_of, by_label, path) -> None:
    """Each trunk from just before its first branch on, with its branches: where the branches differ."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, ds in zip(axes, datasets):
        key = all_key.format(ds)
        for trunk in sorted(set(branch_of.values())):
            family = [by_label[trunk]] + [by_label[b] for b, t in branch_of.items() if t == trunk]
            starts = [branch_point(r.label) or s[0][0] for r in family[1:] if (s := r.series(key))]
            if not starts:
                continue
            earlier = [b for b, _, _ in by_label[trunk].series(key) if b < min(starts)]
            first = earlier[-1] if earlier else min(starts)
            for run in family:
                s = [p for p in _with_trunk(run, key, by_label, branch_of) if p[0] >= first]
                ax.plot(
                    [t / 1e6 for _, t, _ in s], [v for _, _, v in s], marker=".", label=run.label, **styles[run.label]
                )
        ax.set(title=f"{ds}: trunks and their anneal branches", xlabel="tokens (millions)", ylabel="cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_key(run: Run) -> str | None:
    keys = sorted({k for r in run.rows.values() for k in r if k.startswith("lr-")})
    return keys[0] if keys else None


def report(runs: list[Run], out: str, upstream: str | None = None, downstream: str | None = None) -> str:
    """Write ``loss.png``, ``lr.png``, ``forgetting.png`` and ``summary.md`` into ``out`` (local or ``s3://``);
    returns the summary's path."""
    with storage.Destination(out, "cpt report --out") as local:
        _write(runs, local, upstream, downstream)
    return storage.join(out, "summary.md")


def _write(runs: list[Run], out: str, upstream: str | None, downstream: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    up, down = pick_pair(runs, upstream, downstream)
    os.makedirs(out, exist_ok=True)
    all_key = "metrics/eval/{}/all/" + CE
    styles, branch_of, by_label = _family_style(runs), families(runs), {r.label: r for r in runs}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        for ax, ds in zip(axes, (up, down)):
            s = _with_trunk(run, all_key.format(ds), by_label, branch_of)
            ax.plot([t / 1e6 for _, t, _ in s], [v for _, _, v in s], marker=".", label=run.label, **styles[run.label])
    for ax, ds, what in zip(axes, (up, down), ("upstream", "downstream")):
        ax.set(title=f"{what} ({ds}) validation loss", xlabel="tokens (millions)", ylabel="cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    plt.close(fig)

    if branch_of:
        _families_png(runs, (up, down), all_key, styles, branch_of, by_label, os.path.join(out, "families.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run in runs:
        key = lr_key(run)
        if key:
            s = _with_trunk(run, key, by_label, branch_of)
            ax.plot([t / 1e6 for _, t, _ in s], [v for _, _, v in s], label=run.label, **styles[run.label])
    ax.set(title="learning rate", xlabel="tokens (millions)", ylabel="LR")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr.png"), dpi=110)
    plt.close(fig)

    deltas = {}
    for run in runs:
        su, sd = run.series(all_key.format(up)), run.series(all_key.format(down))
        if su and sd:
            deltas[run.label] = (su[-1][2] - su[0][2], sd[-1][2] - sd[0][2], su, sd)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, (du, dd, _, _) in deltas.items():
        ax.scatter(dd, du)
        ax.annotate(label, (dd, du), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(
        title="forgetting vs adaptation",
        xlabel=f"change in downstream loss ({down})",
        ylabel=f"change in upstream loss ({up})",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "forgetting.png"), dpi=110)
    plt.close(fig)

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
    lines += [
        "| run | last batch | upstream first | upstream last | downstream first | downstream last | "
        "upstream change | downstream change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, (du, dd, su, sd) in deltas.items():
        lines.append(
            f"| {label} | {su[-1][0]} | {su[0][2]:.4f} | {su[-1][2]:.4f} | {sd[0][2]:.4f} | "
            f"{sd[-1][2]:.4f} | {du:+.4f} | {dd:+.4f} |"
        )
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
    if branch_of:
        lines += ["![trunks and their branches](families.png)", ""]
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(lines))
