"""The project's local cache root: ``$CPT_CACHE``, else ``~/.cache/cpt``."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> str:
    root = os.environ.get("CPT_CACHE") or os.path.join(Path.home(), ".cache", "cpt")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


@contextmanager
def locked(folder: str):
    """An exclusive file lock on ``folder`` (ranks on one node that share a cache take turns)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
