"""Per-domain evaluation: one eval loader per domain of each dataset's manifest; aggregates and blends.

Metric names (the contract ``cpt report`` reads):
``metrics/eval/<dataset>/<domain-slug>/{LanguageCrossEntropy,LanguagePerplexity}`` from Composer itself,
``metrics/eval/<dataset>/all/...`` token-weighted over the domains, ``metrics/eval/<dataset>/<blend>/...``.
"""

from __future__ import annotations

import logging
import math
import os
import time

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from cpt.data.manifest import Manifest
from cpt.data.mixture import loader_workers, location
from cpt.spec import ConfigError, Cpt

log = logging.getLogger(__name__)

CE, PPL = "LanguageCrossEntropy", "LanguagePerplexity"


def eval_loaders(section: Cpt, manifests: dict[str, Manifest], seq_len: int, cache: str) -> list[dict]:
    """One llm-foundry ``text`` eval loader per (dataset, domain) with at least one sample."""
    loaders = []
    for name, ds in section.eval.datasets.items():
        for _, stats in sorted(manifests[name].domains.items()):
            if stats.samples == 0:
                continue
            loaders.append(
                {
                    "label": f"{name}/{stats.slug}",
                    "name": "text",
                    "dataset": {
                        **location(
                            f"{ds.path.rstrip('/')}/{stats.slug}", os.path.join(cache, "eval", name, stats.slug)
                        ),
                        "max_seq_len": seq_len,
                        "shuffle": False,
                        "num_canonical_nodes": 1,
                    },
                    "drop_last": False,
                    **loader_workers(0),
                }
            )
    return loaders


def blend_weights(section: Cpt, manifests: dict[str, Manifest]) -> dict[str, dict[str, dict[str, float]]]:
    """``{dataset: {blend: {slug: weight}}}``; domains may be named by their name or their slug."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, ds in section.eval.datasets.items():
        slugs = {d: s.slug for d, s in manifests[name].domains.items() if s.samples}
        by_slug = set(slugs.values())
        for blend, weights in ds.blends.items():
            resolved = {}
            for domain, w in weights.items():
                slug = slugs.get(domain, domain if domain in by_slug else None)
                if slug is None:
                    raise ConfigError(
                        f"cpt.eval.datasets.{name}.blends.{blend}: domain {domain!r} is not in "
                        f"{ds.path} (it has {sorted(slugs)})"
                    )
                resolved[slug] = float(w)
            out.setdefault(name, {})[blend] = resolved
    return out


def subset_batches(tokens_per_domain: int | None, seq_len: int, batch_size: int, world: int) -> int:
    """Eval batches per rank that cover the per-domain token budget (-1: the whole domain)."""
    if tokens_per_domain is None:
        return -1
    return max(1, math.ceil(tokens_per_domain / (seq_len * batch_size * world)))


class DomainMetrics(Callback):
    """Logs the token-weighted ``all`` aggregate and the weighted blends of each dataset after an evaluation.

    Per domain it reads the summed loss and token count of Composer's ``LanguageCrossEntropy`` (reduced over
    ranks), so ``all`` is exactly the cross-entropy over every evaluated token.
    """

    KEY = "cpt_domain_metrics"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, blends: dict | None = None):
        self.blends = blends or {}
        self._seen: dict[str, dict[str, tuple[float, int]]] = {}

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.EVAL_END:
            self._record(state)
        elif event in (Event.EVAL_AFTER_ALL, Event.EVAL_STANDALONE_END):
            self._log(logger)

    def _record(self, state: State) -> None:
        label = state.dataloader_label or ""
        parts = label.split("/")
        if len(parts) != 3 or parts[0] != "eval":
            return
        metric = state.eval_metrics.get(label, {}).get(CE)
        if metric is None:
            return
        with metric.sync_context(should_sync=True, should_unsync=True):
            total, tokens = float(metric.sum_loss), int(metric.total_items)
        self._seen.setdefault(parts[1], {})[parts[2]] = (total, tokens)

    def _log(self, logger: Logger) -> None:
        metrics = {}
        for dataset, domains in self._seen.items():
            tokens = sum(n for _, n in domains.values())
            if tokens:
                ce = sum(loss for loss, _ in domains.values()) / tokens
                metrics.update(_pair(f"metrics/eval/{dataset}/all", ce))
            for blend, weights in self.blends.get(dataset, {}).items():
                if not all(slug in domains and domains[slug][1] for slug in weights):
                    continue
                norm = sum(weights.values())
                ce = sum(w * domains[s][0] / domains[s][1] for s, w in weights.items()) / norm
                metrics.update(_pair(f"metrics/eval/{dataset}/{blend}", ce))
        if metrics:
            logger.log_metrics(metrics)
        self._seen = {}


def _pair(prefix: str, ce: float) -> dict[str, float]:
    return {f"{prefix}/{CE}": ce, f"{prefix}/{PPL}": math.exp(min(ce, 80.0))}


class EvalCadence(Callback):
    """When to evaluate: every ``interval`` batches, every ``early_interval`` up to batch ``early_until`` (the
    run's first stretch, whatever the schedule), once at the LR peak, and at the end. ``eval_first`` (set by cpt)
    adds the evaluation before the first step. Every evaluator (domains and tasks) follows it.

    Also gives each evaluator its budget in batches: ``subset_num_batches`` for a domain, and for a task with
    ``examples`` set, enough batches of its own loader for that many examples. Applied after the checkpoint is
    loaded. Tasks run at every ``tasks_every``-th evaluation (``tasks_due``), and always at the first and the last.
    At the end, the log says what share of the run's time evaluation took, tasks apart.
    """

    KEY = "cpt_eval_cadence"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(
        self,
        interval: int,
        early_until: int = 0,
        early_interval: int | None = None,
        peak: int | None = None,
        subset_num_batches: int = -1,
        task_examples: dict[str, int] | None = None,
        tasks_every: int = 1,
    ):
        self.interval, self.early_until, self.early_interval = interval, early_until, early_interval
        self.peak, self.subset_num_batches = peak, subset_num_batches
        self.task_examples = task_examples or {}
        self.tasks_every = tasks_every
        self._counted, self._due_so_far, self._last_tasks = 0, 0, -1
        self._timing: dict[str, float] = {"tasks": 0.0, "perplexity": 0.0}
        self._started: float | None = None
        self._fit_start = 0.0

    def due(self, batch: int) -> bool:
        """Evaluate after ``batch`` batches have trained?"""
        if batch <= 0:
            return False
        if self.interval and batch % self.interval == 0:
            return True
        if self.early_interval and batch <= self.early_until and batch % self.early_interval == 0:
            return True
        return self.peak is not None and batch == self.peak

    def nth(self, batch: int) -> int:
        """How many evaluations are due from batch 1 to ``batch`` (batches only move forward)."""
        while self._counted < batch:
            self._counted += 1
            self._due_so_far += self.due(self._counted)
        return self._due_so_far

    def tasks_due(self, batch: int) -> bool:
        """Tasks after ``batch``: at every ``tasks_every``-th evaluation of perplexity."""
        return self.due(batch) and self.nth(batch) % self.tasks_every == 0

    def __call__(self, state: State, event: Event) -> bool:
        if event == Event.FIT_END:
            return not self.due(int(state.timestamp.batch))  # unless the last batch was just evaluated
        return event == Event.BATCH_END and self.due(int(state.timestamp.batch))

    def for_tasks(self, state: State, event: Event) -> bool:
        batch = int(state.timestamp.batch)
        if event == Event.FIT_END:
            return self._last_tasks != batch  # the last evaluation always scores the tasks
        if event == Event.BATCH_END and self.tasks_due(batch):
            self._last_tasks = batch
            return True
        return False

    def init(self, state: State, logger: Logger) -> None:
        self._fit_start = time.perf_counter()  # before eval_first's evaluation

    def eval_standalone_end(self, state: State, logger: Logger) -> None:
        self._last_tasks = int(state.timestamp.batch)  # eval_first scored them before the first step

    def eval_start(self, state: State, logger: Logger) -> None:
        self._started = time.perf_counter()

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._started is not None:
            kind = "tasks" if str(state.dataloader_label).startswith("tasks/") else "perplexity"
            self._timing[kind] += time.perf_counter() - self._started
            self._started = None

    def fit_end(self, state: State, logger: Logger) -> None:
        total = max(time.perf_counter() - self._fit_start, 1e-9)
        t, p = self._timing["tasks"], self._timing["perplexity"]
        log.info(
            "evaluation took %.1f s of the %.1f s since the trainer started: tasks %.1f s (%.0f%%), "
            "perplexity %.1f s (%.0f%%)",
            t + p, total, t, 100 * t / total, p, 100 * p / total,
        )  # fmt: skip

    def after_load(self, state: State, logger: Logger) -> None:
        world = dist.get_world_size()
        for evaluator in state.evaluators:
            evaluator.eval_interval = self.for_tasks if evaluator.label.startswith("tasks/") else self
            examples = self.task_examples.get(evaluator.label)
            if examples is not None:
                per_batch = evaluator.dataloader.dataloader.batch_size * world
                evaluator.subset_num_batches = max(1, math.ceil(examples / per_batch))
            elif evaluator.label.startswith("eval/"):
                evaluator.subset_num_batches = self.subset_num_batches
