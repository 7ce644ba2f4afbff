"""Chains of continual stages: what a run carries from an earlier stage's checkpoint (``cpt.init``).

The checkpoint is loaded through Composer's ``load_path``, with ``load_weights_only`` for weights alone and
``load_ignore_keys`` for what is not carried. Never carried: eval and train metrics (other loaders). Carried
with the data position only: the callbacks' state (the data fingerprint, so a branch checks that its data
is the trunk's) and the RNG. A carried optimizer brings the old stage's last learning rate; ``StageLR`` sets
this stage's (its schedule at its first batch) before the first step.
"""

from __future__ import annotations

import logging

from composer.core import Callback, State
from composer.loggers import Logger

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
