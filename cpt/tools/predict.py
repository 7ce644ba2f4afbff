"""``cpt predict``: fit the CPT loss law (``cpt.optim.law``) on a few runs, then predict any schedule before paying
for it.

- ``fit RUN... [--pretrain RUN_OR_YAML] --out law.json``: per evaluated domain and blend, one parameter set for
  every run's evaluations (its ``metrics.jsonl``: the losses, and the LR of every batch). The base model's own
  pre-training enters through its areas: a cpt run, or a schedule YAML (``yamls/pretrain/pythia.yaml``).
- ``curve law.json YAML [key=value ...]``: the candidate run's curves, its LR computed by cpt's own schedule
  functions (the ones ``cpt schedule`` draws); a CSV and a PNG, with the measured points when the run exists.
- ``sweep law.json YAML --grid key=v1,v2 ...``: every combination ranked by predicted final upstream and
  downstream loss (``--weight``), the Pareto front marked, a table and a figure.

Replay (``cpt.train.*.proportion``) is not in the law as fitted here: the paper models it with extra terms fitted
on runs at several replay ratios, and cpt's runs do not vary it. A grid over it is refused, not guessed.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from cpt.io import storage, untrusted
from cpt.optim import law
from cpt.tools import report

CE = "LanguageCrossEntropy"
log = logging.getLogger(__name__)


@dataclass
class RunCurves:
    label: str
    lrs: np.ndarray  # the LR of batch 0 .. n-1
    losses: dict[str, tuple[np.ndarray, np.ndarray]]  # "<dataset>/<domain>" -> (batches, losses)


def read_run(path: str) -> RunCurves:
    """A run's every-batch LR and its evaluations, from its ``metrics.jsonl`` (checked as untrusted)."""
    return curves_of(report.load(path, label=os.path.basename(path.rstrip("/"))), path)


def curves_of(run: report.Run, where: str) -> RunCurves:
    """A loaded run's every-batch LR and its evaluations; ``LawError`` when a batch's LR is missing."""
    key = report.lr_key(run)
    if key is None:
        raise law.LawError(f"{where}: metrics.jsonl logs no LR (add callbacks.lr_monitor: {{}} to the run)")
    logged = {b: v for b, _, v in run.series(key)}
    last = max(logged)
    missing = [b for b in range(last) if b not in logged]
    if missing:
        raise law.LawError(f"{where}: the LR of batch {missing[0]} is not logged: the law needs every batch's LR")
    bad = [b for b in range(last) if not (math.isfinite(logged[b]) and logged[b] >= 0)]
    if bad:
        raise law.LawError(f"{where}: the LR of batch {bad[0]} is {logged[bad[0]]!r}, not a finite non-negative number")
    return RunCurves(run.label, np.array([logged[b] for b in range(last)], dtype=float), _losses(run, 0, last))


def _losses(run: report.Run, first: int, last: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``"<dataset>/<domain>" -> (batches, losses)`` for every evaluation from batch ``first`` to ``last``."""
    losses = {}
    for dataset in run.datasets():
        for domain in run.domains(dataset):
            series = run.series(f"metrics/eval/{dataset}/{domain}/{CE}")
            points = [(b, v) for b, _, v in series if first <= b <= last]
            if points:
                b, v = zip(*points)
                losses[f"{dataset}/{domain}"] = (np.array(b), np.array(v, dtype=float))
    return losses


def pretrain_lrs(spec: str | None) -> np.ndarray:
    """The base model's pre-training LRs: none (a model trained from scratch here), a cpt run's, or a schedule
    YAML's (``pretrain: {lr, steps, scheduler}``, computed by cpt's schedule functions)."""
    if not spec:
        return np.empty(0)
    if spec.endswith((".yaml", ".yml")):
        return schedule_lrs(*pretrain_schedule(spec))
    return read_run(spec).lrs


def pretrain_schedule(path: str):
    """``pretrain: {lr, steps, scheduler: {...}}`` from a YAML -> (lr, a scheduler, its clock, steps)."""
    import yaml

    from cpt.optim import schedules

    with open(path) as fh:
        doc = yaml.safe_load(fh)
    section = doc.get("pretrain") if isinstance(doc, dict) else None
    if not isinstance(section, dict) or set(section) != {"lr", "steps", "scheduler"}:
        raise ValueError(f"{path}: expected pretrain: {{lr, steps, scheduler}} and nothing else")
    lr, steps, sched = section["lr"], section["steps"], dict(section["scheduler"] or {})
    if not isinstance(steps, int) or steps < 1 or not isinstance(lr, int | float) or lr <= 0:
        raise ValueError(f"{path}: pretrain.lr must be positive and pretrain.steps a positive integer")
    try:
        scheduler = schedules.make_scheduler(sched.pop("name", ""), **sched)
        clock = schedules.Clock(f"{steps}ba", 1)
        scheduler.phases(clock)
    except ValueError as exc:
        raise ValueError(f"{path}: pretrain.scheduler: {exc}") from exc
    return float(lr), scheduler, clock, steps


def schedule_lrs(lr: float, scheduler, clock, steps: int) -> np.ndarray:
    return np.array([lr * scheduler.multiplier(float(t), clock) for t in range(steps)])


def fit(runs: list[str], pretrain: str | None, out: str, starts: int = 8) -> dict:
    """Fit every domain that all the runs evaluated; write ``out`` (JSON) and return it."""
    curves = [read_run(r) for r in runs]
    pre = law.Pretrain.of(pretrain_lrs(pretrain))
    keys = sorted(set.intersection(*(set(c.losses) for c in curves)))
    if not keys:
        raise law.LawError("the runs share no evaluated domain")
    domains = {}
    for key in keys:
        data = [(law.areas(c.lrs, c.losses[key][0], pre), c.losses[key][1]) for c in curves]
        domains[key] = law.fit(data, starts=starts).to_json()
    doc = {
        "formula": "L = L0 + A*(S1pt+S1cpt)^-alpha - C*S2 + B*(1-(1+E*S1cpt)^-beta)  (cpt.optim.law)",
        "lambda": law.LAMBDA,
        "pretrain": {"s1": pre.s1, "s2": pre.s2, "m": pre.m, "last_lr": pre.last_lr, "from": pretrain or None},
        "runs": runs,
        "s1_cpt_max": max(float(c.lrs.sum()) for c in curves),  # the largest forward area a fitted run spent
        "domains": domains,
    }
    storage.write_bytes(out, json.dumps(doc, indent=1).encode())
    return doc


def load_law(path: str) -> tuple[law.Pretrain, dict[str, law.Fit], float]:
    """A ``law.json`` read back (checked): the pre-training areas, each domain's fit, and the largest forward area a
    fitted run spent (beyond it the law extrapolates)."""
    doc = untrusted.record(path, "a fitted law")
    try:
        p = doc["pretrain"]
        pre = law.Pretrain(float(p["s1"]), float(p["s2"]), float(p["m"]), float(p["last_lr"]))
        fits = {str(k): law.Fit.from_json(v, f"{path}: domains.{k}") for k, v in dict(doc["domains"]).items()}
        fitted = float(doc["s1_cpt_max"])
    except (KeyError, TypeError, ValueError) as exc:
        raise law.LawError(f"{path}: not a law written by cpt predict fit ({exc!r})") from exc
    return pre, fits, fitted


def extrapolation(fitted: float, lrs: np.ndarray) -> str | None:
    """A warning when a candidate spends more forward area than any fitted run: the law extrapolates there."""
    spent = float(lrs.sum())
    if spent > fitted * 1.05:
        return f"extrapolating: the candidate's forward area ({spent:.4g}) is {spent / fitted:.1f}x the largest fitted"
    return None


def predicted(
    fits: dict[str, law.Fit], pre: law.Pretrain, lrs: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every domain's predicted loss after 0 .. len(lrs) batches, and its standard error (``law.Fit.sd``)."""
    a = law.areas(lrs, np.arange(len(lrs) + 1), pre)
    return {k: law.predict(f.params, a) for k, f in fits.items()}, {k: f.sd(a) for k, f in fits.items()}


def candidate_lrs(yaml_path: str, overrides: list[str]) -> tuple[np.ndarray, object]:
    """A train YAML's LR of every batch, by cpt's own schedule functions (what ``cpt schedule`` draws)."""
    from cpt import config

    checked = config.check(config.load(yaml_path, overrides), yaml_path)
    return schedule_lrs(checked.lr, checked.scheduler, checked.clock, checked.total_batches), checked


def curve(law_path: str, yaml_path: str, overrides: list[str], out: str) -> dict[str, np.ndarray]:
    """The candidate's predicted curves -> ``<out>.csv`` and ``<out>.png`` (measured points overlaid when the run
    exists in its run folder)."""
    pre, fits, fitted = load_law(law_path)
    lrs, checked = candidate_lrs(yaml_path, overrides)
    if warning := extrapolation(fitted, lrs):
        print(f"warning: {warning}")
    curves, sds = predicted(fits, pre, lrs)
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    with open(out + ".csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["batch", "lr", *(c for k in curves for c in (k, f"{k} sd"))])
        for b in range(len(lrs) + 1):
            cells = (f"{v[b]:.6f}" for k in curves for v in (curves[k], sds[k]))
            w.writerow([b, lrs[b] if b < len(lrs) else "", *cells])
    measured = None
    run_dir = os.path.join(checked.section.run_dir, checked.run_name)
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        measured = read_run(run_dir)
    _draw_curves(curves, sds, measured, out + ".png", checked.run_name)
    return curves, sds


def _draw_curves(
    curves: dict[str, np.ndarray], sds: dict[str, np.ndarray], measured: RunCurves | None, path: str, title: str
) -> None:
    from cpt.tools.figures import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (key, y) in enumerate(sorted(curves.items())):
        color = f"C{i % 10}"
        x = np.arange(len(y))
        ax.plot(x, y, color=color, label=f"{key} (law)")
        band = np.where(np.isfinite(sds[key]), 2 * sds[key], np.nan)
        ax.fill_between(x, y - band, y + band, color=color, alpha=0.15, linewidth=0)
        if measured is not None and key in measured.losses:
            b, v = measured.losses[key]
            ax.plot(b, v, "o", color=color, markersize=3, label=f"{key} (measured)")
    ax.set_xlabel("batch")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{title}: the CPT law's prediction (band: 2 standard errors)")
    ax.legend(fontsize=7)
    save(fig, path)


def sweep(
    law_path: str, yaml_path: str, overrides: list[str], grid: list[str], weight: float, out: str | None,
    upstream: str | None = None, downstream: str | None = None,
) -> list[dict]:  # fmt: skip
    """Every combination of ``grid`` (``key=v1,v2``), ranked by ``weight x upstream + (1 - weight) x downstream``
    final loss (each dataset's ``all``: by default ``pile`` and ``slimpajama``, else ``upstream`` and
    ``downstream``, as ``cpt report``); ``pareto`` marks the candidates no other beats on both."""
    pre, fits, fitted = load_law(law_path)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"--weight {weight} must be in [0, 1]")
    if upstream is None and downstream is None:
        pair = next((p for p in (("pile", "slimpajama"), ("upstream", "downstream")) if f"{p[0]}/all" in fits), None)
        upstream, downstream = pair or ("upstream", "downstream")
    upstream, downstream = f"{upstream}/all", f"{downstream}/all"
    for key in (upstream, downstream):
        if key not in fits:
            raise law.LawError(f"{law_path}: no fit for {key!r} (have: {', '.join(sorted(fits))})")
    axes = []
    for spec in grid:
        key, eq, values = spec.partition("=")
        if not eq or not values:
            raise ValueError(f"--grid {spec!r}: expected key=v1,v2,...")
        if key.startswith("cpt.train.") or "proportion" in key:
            raise ValueError(
                f"--grid {key}: replay is not in the law as fitted here (its runs do not vary the mixture); "
                "fit runs at several replay ratios to predict it"
            )
        axes.append([f"{key}={v}" for v in values.split(",")])
    rows = []
    for combo in itertools.product(*axes):
        lrs, _ = candidate_lrs(yaml_path, [*overrides, *combo])
        end = law.areas(lrs, np.array([len(lrs)]), pre)  # only the final loss ranks a candidate
        (up, up_sd), (down, down_sd) = (
            (float(law.predict(fits[k].params, end)[0]), float(fits[k].sd(end)[0])) for k in (upstream, downstream)
        )
        rows.append({"candidate": " ".join(combo), "upstream": up, "downstream": down,
                     "upstream_sd": up_sd, "downstream_sd": down_sd,
                     "score": weight * up + (1 - weight) * down,
                     "extrapolated": extrapolation(fitted, lrs) is not None})  # fmt: skip
    for r in rows:
        mine = (r["upstream"], r["downstream"])  # dominated: another is no worse on both and better on one
        r["pareto"] = not any(
            o["upstream"] <= mine[0] and o["downstream"] <= mine[1] and (o["upstream"], o["downstream"]) != mine
            for o in rows
        )
    rows.sort(key=lambda r: r["score"])
    if out:
        _draw_front(rows, out, upstream, downstream)
    return rows


def _draw_front(rows: list[dict], path: str, upstream: str, downstream: str) -> None:
    from cpt.tools.figures import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        ax.plot(r["upstream"], r["downstream"], "o", color="C3" if r["pareto"] else "0.6")
        ax.annotate(r["candidate"], (r["upstream"], r["downstream"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["upstream"])
    ax.plot([r["upstream"] for r in front], [r["downstream"] for r in front], "-", color="C3", label="Pareto front")
    ax.set_xlabel(f"predicted final {upstream} loss (forgetting: lower is better)")
    ax.set_ylabel(f"predicted final {downstream} loss (adaptation: lower is better)")
    ax.legend()
    save(fig, path)


def overlay(runs: list[report.Run], law_path: str) -> dict[str, dict[str, np.ndarray]]:
    """For ``cpt report --law``: per run, each dataset's ``all`` loss as the law predicts it after every batch,
    from the LRs the run logged. A run without every batch's LR (a branch logs from the branch point) is skipped,
    and said so."""
    pre, fits, _ = load_law(law_path)
    datasets = {k.split("/")[0]: k for k in fits if k.endswith("/all")}
    out = {}
    for run in runs:
        try:
            lrs = curves_of(run, run.label).lrs
        except law.LawError as exc:
            log.warning("no CPT law curve for %s: %s", run.label, exc)
            continue
        curves, _ = predicted({k: fits[k] for k in datasets.values()}, pre, lrs)
        out[run.label] = {ds: curves[k] for ds, k in datasets.items()}
    return out


def branch_curves(trunk: RunCurves, branch_path: str, at: int) -> RunCurves:
    """A branch's curves with its whole LR history: the trunk's LRs up to the branch point, then its own (a branch
    logs from the branch point on)."""
    run = report.load(branch_path, label=os.path.basename(branch_path.rstrip("/")))
    key = report.lr_key(run)
    own = {b: v for b, _, v in run.series(key)} if key else {}
    last = max(own, default=at)
    if any(b not in own for b in range(at, last)) or len(trunk.lrs) < at:
        raise law.LawError(f"{branch_path}: its LRs from batch {at} on, or the trunk's before it, are not all logged")
    lrs = np.concatenate([trunk.lrs[:at], [own[b] for b in range(at, last)]])
    return RunCurves(run.label, lrs, _losses(run, at, last))


def predict_held(fitted: list[RunCurves], target: RunCurves, pre: law.Pretrain, keys: list[str]) -> dict[str, dict]:
    """Fit on ``fitted``, predict ``target``'s evaluations per domain: the error at the end, the mean absolute
    error over the curve, the spread of the fitted runs' final losses, the fit's R², and the prediction's own
    standard error at the end (``law.Fit.sd``)."""
    out = {}
    for key in keys:
        f = law.fit([(law.areas(c.lrs, c.losses[key][0], pre), c.losses[key][1]) for c in fitted])
        batches, measured = target.losses[key]
        a = law.areas(target.lrs, batches, pre)
        guess = law.predict(f.params, a)
        finals = [c.losses[key][1][-1] for c in fitted]
        out[key] = {
            "final_error": float(guess[-1] - measured[-1]),
            "mae": float(np.mean(np.abs(guess - measured))),
            "spread": float(max(finals) - min(finals)),
            "r2_fit": f.r2,
            "sd_end": float(f.sd(a)[-1]),
        }
    return out


def leave_one_out(runs: dict[str, str], held: str, pretrain: str | None, keys: list[str]) -> dict[str, dict]:
    """Fit on every run but ``held``, predict ``held``'s whole curve per domain (``predict_held``)."""
    fitted = [read_run(p) for name, p in runs.items() if name != held]
    return predict_held(fitted, read_run(runs[held]), law.Pretrain.of(pretrain_lrs(pretrain)), keys)
