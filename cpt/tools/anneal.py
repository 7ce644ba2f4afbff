"""``cpt anneal``: a decay branch off a running (or finished) trunk: the trunk's whole state, its data stream,
and the LR decayed from the trunk's value at that point to ``alpha_f`` (``cpt_anneal``).

The branch is an ordinary cpt run with its own run name and save folder (a sibling of the trunk's): its YAML
is the trunk's as launched (``cpt-run.json`` in the trunk's save folder) with ``cpt.init`` carrying
optimizer, clock and data from the trunk's checkpoint, ``scheduler: cpt_anneal`` and ``max_duration`` at the
branch's end. It resumes after preemption like any run; the trunk's folder is only read.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from cpt import config
from cpt.io import storage, untrusted
from cpt.optim.schedules import ANNEAL_SHAPES
from cpt.run import checkpoints, record
from cpt.spec import CARRY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Branch:
    name: str
    path: str  # the branch's YAML
    save_folder: str
    at: int  # the trunk's batch it leaves at
    length: int  # batches
    m_start: float  # the trunk's LR multiplier there

    def command(self, gpus: int) -> str:
        return config.launch_command(self.path, gpus)


def sibling(save_folder: str, trunk: str, branch: str) -> str:
    """The branch's save folder: the trunk's with its run name replaced, else ``<trunk folder>-<branch>``."""
    parts = save_folder.rstrip("/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == trunk:
            return "/".join(parts[:i] + [branch] + parts[i + 1 :])
    return f"{save_folder.rstrip('/')}-{branch}"


def recorded_launch(trunk_folder: str) -> DictConfig:
    """The trunk's recorded launch (``cpt-run.json``), as input someone else may have written: it may not use
    resolvers, or grant remote code, ``code_paths`` or a fingerprint change. ``UntrustedError`` naming what is
    wrong. Where the branch writes is printed by ``cpt anneal`` before anything runs."""
    where = storage.join(trunk_folder, record.RUN_SPEC)
    spec = record.read_run_spec(trunk_folder)
    if spec is None:
        raise ValueError(f"{trunk_folder} is not the save folder of a cpt run ({record.RUN_SPEC} is missing)")
    cfg = config.compose(spec["yaml"], spec["overrides"], where)
    untrusted.granted(cfg, where)
    return cfg


def plan_branch(
    trunk_folder: str, at: str, length: str, shape: str = "linear", alpha_f: float = 0.0, out: str = "branches"
) -> Branch:
    """Write the branch's YAML into ``out``; ``ValueError`` or ``ConfigError`` naming what is wrong.

    Where the branch writes derives from ``trunk_folder`` as given (normalised), never from the record."""
    if shape not in ANNEAL_SHAPES:
        raise ValueError(f"--shape {shape!r}: one of {', '.join(ANNEAL_SHAPES)}")
    trunk_folder = untrusted.folder(trunk_folder)
    cfg = recorded_launch(trunk_folder)
    where = storage.join(trunk_folder, record.RUN_SPEC)
    trunk = config.check(config.resolved(cfg, where), where)
    recorded = trunk.save_folder and untrusted.folder(trunk.save_folder)
    if recorded and recorded != trunk_folder:
        log.warning(
            "%s records the save folder %s: the branch derives from %s", record.RUN_SPEC, recorded, trunk_folder
        )
    found = checkpoints.listing(trunk_folder)
    want = os.path.basename(str(at).rstrip("/"))
    ck = next((c for c in found if (want.isdigit() and c.batch == int(want)) or c.name == want), None)
    if ck is None:
        raise ValueError(f"--at {at}: {trunk_folder} has no such checkpoint (batches {[c.batch for c in found]})")
    try:
        batches = math.ceil(trunk.clock.batches(length, "--length"))
    except ValueError as exc:
        raise ValueError(str(exc)) from exc
    if batches < 1:
        raise ValueError(f"--length {length}: at least one batch")
    m_start = trunk.scheduler.multiplier(float(ck.batch), trunk.clock)
    if not 0 <= alpha_f <= m_start:
        raise ValueError(f"--to {alpha_f}: an anneal decays, from the trunk's multiplier there ({m_start:.4g}) down")
    name = f"{trunk.run_name}-anneal{ck.batch}-{shape}-{batches}ba"
    save = untrusted.folder(sibling(trunk_folder, trunk.run_name, name))
    if untrusted.inside(save, trunk_folder):
        raise ValueError(f"the branch's save folder {save} would be the trunk's, or inside it")
    config.rename(cfg, name)
    cfg.save_folder = save
    cfg.max_duration = f"{ck.batch + batches}ba"
    OmegaConf.update(cfg, "scheduler", {
        "name": "cpt_anneal", "t_start": f"{ck.batch}ba", "t_length": f"{batches}ba", "m_start": m_start,
        "alpha_f": alpha_f, "shape": shape,
    }, merge=False)  # fmt: skip
    OmegaConf.update(cfg, "cpt.init", {"from": storage.join(trunk_folder, ck.name), "carry": list(CARRY)}, merge=False)
    if OmegaConf.select(cfg, "cpt.from_scratch"):
        cfg.cpt.from_scratch = False  # a trunk trained from scratch: the branch starts from its checkpoint
    config.check(
        config.resolved(cfg, f"branch {name}"), f"branch {name}"
    )  # the branch's YAML is a valid run before it is written
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.yaml")
    OmegaConf.save(cfg, path)
    return Branch(name, path, save, ck.batch, batches, m_start)
