"""The project's local cache root: ``$CPT_CACHE``, else ``~/.cache/cpt``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> str:
    root = os.environ.get("CPT_CACHE") or os.path.join(Path.home(), ".cache", "cpt")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path
