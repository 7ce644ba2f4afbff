"""A run's record of its launch (``cpt-run.json`` in the save folder): written after every check passed, read
back by the next launch (is the folder this run's?) and by ``cpt anneal`` (what to branch from)."""

from __future__ import annotations

import json
import logging

from cpt.io import redact, storage, untrusted
from cpt.spec import ConfigError

log = logging.getLogger(__name__)

RUN_SPEC = "cpt-run.json"  # in the save folder: the YAML and overrides a run was launched with


def write_run_spec(save_folder: str, yaml_path: str, overrides: list[str], run_name: str) -> None:
    """Record the launch (the YAML's text, unresolved, and the overrides) next to the checkpoints, so that a
    branch can be derived from the run later (``cpt anneal``). Secrets stay interpolations: an override whose
    key looks secret, or whose value is or carries a secret (``redact.secret_override``), is left out of the
    record (and said so)."""
    kept = []
    for o in overrides:
        if redact.secret_override(o):
            log.warning(
                "not recording the override %s=*** in %s: it looks like a secret", o.partition("=")[0], RUN_SPEC
            )
            continue
        kept.append(o)
    with open(yaml_path) as fh:
        spec = {"yaml": fh.read(), "overrides": kept, "config": yaml_path, "run_name": run_name}
    storage.write_bytes(storage.join(save_folder, RUN_SPEC), json.dumps(spec, indent=1).encode())


def read_run_spec(save_folder: str) -> dict | None:
    """The recorded launch in ``save_folder``, checked (``cpt.io.untrusted.run_spec``); None when there is none."""
    path = storage.join(save_folder, RUN_SPEC)
    if not storage.exists(path):
        return None
    return untrusted.run_spec(untrusted.read(path, "the recorded launch"), path)


def check_owner(save_folder: str, run_name: str, where: str) -> None:
    """``ConfigError`` when ``save_folder`` holds another run's record: a folder is one run's."""
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
