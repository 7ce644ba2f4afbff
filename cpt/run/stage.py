"""Chains of continual stages: what a run carries from an earlier stage's checkpoint (``cpt.init``).

The checkpoint is loaded through Composer's ``load_path``, with ``load_weights_only`` for weights alone and
``load_ignore_keys`` for what is not carried. Never carried: eval and train metrics (other loaders). Carried
with the data position only: the callbacks' state (the data fingerprint, so a branch checks that its data
is the trunk's) and the RNG. A carried optimizer brings the old stage's last learning rate; ``StageLR`` sets
this stage's (its schedule at its first batch) before the first step.

A stage that carries the clock starts at the old stage's batch, and llm-foundry evaluates first only at batch 0
(``eval_first``). ``StageStart`` makes a new stage's first batch count as its start: the stage is evaluated there and
its LR logged there, as a run from batch 0 is. A relaunch after a preemption resumes its own checkpoint and is not
a stage's start.
"""

from __future__ import annotations

import logging

from composer.core import Callback, Event, State, Timestamp
from composer.loggers import Logger

from cpt.run.metrics_log import first_lrs
from cpt.spec import ConfigError

log = logging.getLogger(__name__)


def ignore_keys(carry: list[str]) -> list[str]:
    """Composer's ``load_ignore_keys`` for what ``carry`` leaves behind (weights always come)."""
    keys = ["state/train_metrics", "state/eval_metrics"]
    if "optimizer" not in carry:
        keys.append("state/optimizers")
    if "clock" not in carry:
        keys += ["state/timestamp", "state/schedulers"]
    if "data" not in carry:
        keys += ["state/dataset_state", "state/callbacks", "rng"]
    return keys


def check_clock(batch: int, total: int, phases: list[tuple[str, float]], scheduler: str, where: str) -> None:
    """``ConfigError`` when continuing a checkpoint's clock at ``batch`` makes no sense for this run's schedule."""
    if batch >= total:
        raise ConfigError(
            f"{where}: cpt.init carries the clock of a checkpoint at batch {batch}, at or past this run's "
            f"max_duration ({total} batches): nothing would train. Lengthen max_duration"
        )
    name, start = phases[-1]
    if name == "flat" and batch >= start:
        raise ConfigError(
            f"{where}: cpt.init carries the clock to batch {batch}, but the {scheduler} schedule's decay ended at "
            f"batch {start:.0f}: the LR would stay at its floor for the whole stage. Carry no clock (and "
            "re-warm), or use cpt_infinite, whose constant phase continues across stages"
        )


class StageLR(Callback):
    """After the old stage's optimizer is loaded, every parameter group trains at this stage's LR."""

    KEY = "cpt_stage_lr"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, lr: float, multiplier: float):
        self.lr, self.multiplier = lr, multiplier

    def after_load(self, state: State, logger: Logger) -> None:
        for optimizer in state.optimizers:
            for group in optimizer.param_groups:
                group["initial_lr"], group["lr"] = self.lr, self.lr * self.multiplier
        for scheduler in state.schedulers:
            scheduler.base_lrs = [self.lr for _ in scheduler.base_lrs]
        log.info("the carried optimizer trains at this stage's LR: %g x %g", self.lr, self.multiplier)


class StageStart(Callback):
    """Evaluation and the LR at the first batch of a stage that carries the clock.

    llm-foundry runs ``eval_first`` only when the loaded clock is at batch 0. After the load (the last event of the
    Trainer's construction) this callback holds the loaded clock back and shows batch 0; at the first event after
    llm-foundry's check (the first evaluation's start, or the fit's start when ``eval_first`` is off) the clock is
    put back, so every row is logged at the stage's true batch. Between the two, nothing reads the clock: Composer
    finishes its construction and llm-foundry logs the config. At the fit's start the LR the first batch trains at
    is logged, as ``MetricsJSONL`` does for a run from batch 0. Wired last, so other callbacks' ``after_load`` see
    the loaded clock."""

    KEY = "cpt_stage_start"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, batch: int):
        self.batch = batch  # the carried clock's batch (cpt.init's checkpoint)
        self._held: Timestamp | None = None

    def after_load(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch > 0:
            self._held, state.timestamp = state.timestamp, Timestamp()

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        super().run_event(event, state, logger)
        if event in (Event.EVAL_STANDALONE_START, Event.FIT_START) and self._held is not None:
            state.timestamp, self._held = self._held, None
            log.info("the stage starts at the carried batch %d: evaluated and its LR logged there", self.batch)
        if event == Event.FIT_START and int(state.timestamp.batch) == self.batch > 0:
            logger.log_metrics(first_lrs(state))
