"""``cpt schedule``: a schedule's phases, its LR curve as CSV and PNG, before any GPU time is spent."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

from cpt.config import Checked
from cpt.optim.schedules import Clock, Schedule
from cpt.tools.figures import pyplot, save, token_axis

MAX_POINTS = 20_000


@dataclass
class Preview:
    label: str
    lr: float
    total_batches: int
    tokens_per_batch: int
    phases: list[tuple[str, float]]  # name, start batch
    scheduler: Schedule
    clock: Clock

    def lr_at(self, batch: float) -> float:
        return self.lr * self.scheduler.multiplier(batch, self.clock)

    def curve(self, points: int = MAX_POINTS) -> list[tuple[int, int, float]]:
        """``(batch, tokens before it, LR it trains at)``, every batch or an even stride over the run."""
        stride = max(1, math.ceil(self.total_batches / points))
        batches = sorted(
            set(range(0, self.total_batches, stride)) | {math.ceil(s) for _, s in self.phases if s < self.total_batches}
        )
        return [(b, b * self.tokens_per_batch, self.lr_at(b)) for b in batches]


def preview(checked: Checked, label: str) -> Preview:
    clock = checked.clock
    return Preview(
        label,
        checked.lr,
        checked.total_batches,
        clock.tokens_per_batch,
        checked.scheduler.phases(clock),
        checked.scheduler,
        clock,
    )


def describe(p: Preview) -> str:
    lines = [
        f"{p.label}: {p.total_batches:,} batches x {p.tokens_per_batch:,} tokens = "
        f"{p.total_batches * p.tokens_per_batch:,} tokens, max LR {p.lr:g}",
        f"  {'phase':<14} {'start step':>12} {'start tokens':>18} {'LR there':>12}",
    ]
    for name, start in p.phases:
        step = math.ceil(start)
        lines.append(f"  {name:<14} {step:>12,} {step * p.tokens_per_batch:>18,} {p.lr_at(step):>12.4g}")
    last = p.total_batches - 1
    lines.append(f"  {'last batch':<14} {last:>12,} {last * p.tokens_per_batch:>18,} {p.lr_at(last):>12.4g}")
    return "\n".join(lines)


def write_csv(previews: list[Preview], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "batch", "tokens", "lr"])
        for p in previews:
            for batch, tokens, lr in p.curve():
                w.writerow([p.label, batch, tokens, f"{lr:.6g}"])


def write_png(previews: list[Preview], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    scale, xlabel = token_axis(max(p.total_batches * p.tokens_per_batch for p in previews))
    for i, p in enumerate(previews):
        curve = p.curve()
        (line,) = ax.plot([t / scale for _, t, _ in curve], [lr for _, _, lr in curve], label=p.label, lw=1.6)
        for j, (name, start) in enumerate(p.phases[1:]):
            x = start * p.tokens_per_batch / scale
            ax.axvline(x, color=line.get_color(), ls=":", lw=0.8, alpha=0.7)
            ax.annotate(  # staggered down the axis: neighbouring phases' labels do not overlap
                name,
                (x, p.lr * (0.98 - 0.07 * i - 0.3 * (j % 3))),
                fontsize=7,
                color=line.get_color(),
                rotation=90,
                ha="right",
                va="top",
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule (the LR each batch trains at)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path, dpi=120)
