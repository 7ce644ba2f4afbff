"""The training data's fingerprint: stored in every checkpoint, checked when a run resumes from one."""

from __future__ import annotations

import hashlib
import json
import logging

from composer.core import Callback

from cpt.data.manifest import Manifest
from cpt.spec import Cpt

log = logging.getLogger(__name__)


def fingerprint(section: Cpt, manifests: dict[str, Manifest]) -> str:
    """Identifies the training data: each source's manifest fingerprint and its share of the mixture."""
    body = {name: [manifests[name].fingerprint, section.train[name].proportion] for name in sorted(section.train)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class FingerprintError(ValueError):
    """A checkpoint trained on other data than this config's; the message says how to resume anyway."""


def check(stored: str | None, current: str, allow_change: bool, where: str = "the checkpoint") -> None:
    """``FingerprintError`` when ``stored`` (a checkpoint's) is not ``current`` and no change is allowed."""
    if not stored or stored == current:
        return
    msg = (
        f"{where} was trained on data with fingerprint {str(stored)[:12]}..., but this config's data "
        f"(sources, proportions, tokenizer, sequence length) has {current[:12]}..."
    )
    if not allow_change:
        raise FingerprintError(msg + "; set cpt.allow_fingerprint_change=true to resume anyway")
    log.warning("%s; resuming anyway (cpt.allow_fingerprint_change)", msg)


def stored(state: dict) -> str | None:
    """The fingerprint a loaded checkpoint's ``state`` holds (``FingerprintGuard``'s), if any."""
    guard = (state.get("callbacks") or {}).get("FingerprintGuard") if isinstance(state, dict) else None
    value = guard.get("fingerprint") if isinstance(guard, dict) else None
    return value if isinstance(value, str) else None


class FingerprintGuard(Callback):
    """Stores the data fingerprint in every checkpoint; refuses to resume onto different data."""

    KEY = "cpt_fingerprint"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, fingerprint: str, allow_change: bool = False):
        self.fingerprint, self.allow_change = fingerprint, allow_change

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        check(state.get("fingerprint"), self.fingerprint, self.allow_change)
