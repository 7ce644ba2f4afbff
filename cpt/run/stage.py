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


RUN_SPEC = "cpt-run.json"  # in the save folder: the YAML and overrides a run was launched with


def write_run_spec(save_folder: str, yaml_path: str, overrides: list[str], run_name: str) -> None:
    """Record the launch (the YAML's text, unresolved, and the overrides) next to the checkpoints, so that a
    branch can be derived from the run later (``cpt anneal``). Secrets stay interpolations: an override whose
    key looks secret, or whose value carries URL credentials, is left out of the record (and said so)."""
    import json

    from cpt.io import redact, storage

    kept = []
    for o in overrides:
        name, _, value = o.partition("=")
        if redact.is_secret_key(name) or redact.text(value) != value or redact.looks_secret(value):
            log.warning("not recording the override %s=*** in %s: it looks like a secret", name, RUN_SPEC)
            continue
        kept.append(o)
    with open(yaml_path) as fh:
        spec = {"yaml": fh.read(), "overrides": kept, "config": yaml_path, "run_name": run_name}
    storage.write_bytes(storage.join(save_folder, RUN_SPEC), json.dumps(spec, indent=1).encode())


def read_run_spec(save_folder: str) -> dict | None:
    """The recorded launch in ``save_folder``, checked (``cpt.io.untrusted.run_spec``); None when there is none."""
    from cpt.io import storage, untrusted

    path = storage.join(save_folder, RUN_SPEC)
    if not storage.exists(path):
        return None
    return untrusted.run_spec(untrusted.read(path, "the recorded launch"), path)


def check_owner(save_folder: str, run_name: str, where: str) -> None:
    """``ConfigError`` when ``save_folder`` holds another run's record: a folder is one run's."""
    from cpt.io import storage, untrusted

    try:
        spec = read_run_spec(save_folder)
    except (untrusted.UntrustedError, storage.StorageError) as exc:
        raise ConfigError(f"{where}: save_folder: {exc}") from exc
    if spec is None:
        return
    owner = spec.get("run_name")
    if owner is not None and owner != run_name:
        raise ConfigError(
            f"{where}: save_folder {save_folder} belongs to the run {owner!r} ({RUN_SPEC}), not {run_name!r}: "
            "a save folder is one run's. Give this run a save_folder of its own (a new folder, e.g. ending in "
            f"/{run_name})"
        )
