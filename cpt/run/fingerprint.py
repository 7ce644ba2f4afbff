"""The training data's fingerprint: stored in every checkpoint, checked when a run resumes from one."""

from __future__ import annotations

import hashlib
import json
import logging

from composer.core import Callback

from cpt.config import Cpt
from cpt.data.manifest import Manifest

log = logging.getLogger(__name__)


def fingerprint(section: Cpt, manifests: dict[str, Manifest]) -> str:
    """Identifies the training data: each source's manifest fingerprint and its share of the mixture."""
    body = {name: [manifests[name].fingerprint, section.train[name].proportion] for name in sorted(section.train)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class FingerprintGuard(Callback):
    """Stores the data fingerprint in every checkpoint; refuses to resume onto different data."""

    def __init__(self, fingerprint: str, allow_change: bool = False):
        self.fingerprint, self.allow_change = fingerprint, allow_change

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        old = state.get("fingerprint")
        if old and old != self.fingerprint:
            msg = (
                f"the checkpoint was trained on data with fingerprint {old[:12]}..., but this config's data "
                f"(sources, proportions, tokenizer, sequence length) has {self.fingerprint[:12]}..."
            )
            if not self.allow_change:
                raise ValueError(msg + "; set cpt.allow_fingerprint_change=true to resume anyway")
            log.warning("%s; resuming anyway (cpt.allow_fingerprint_change)", msg)
