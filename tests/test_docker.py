"""The Dockerfile copies only what exists, and its pins match pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_every_copied_path_exists():
    copies = [line.split()[1:-1] for line in DOCKERFILE.splitlines() if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), src


def test_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = dict(d.split("==") for d in deps if "==" in d)
    in_docker = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', DOCKERFILE))
    assert in_docker, "the Dockerfile pins nothing"
    for name, version in in_docker.items():
        assert pinned.get(name) == version, (name, version, pinned.get(name))
    assert "pip install -c constraints.txt -e ." in DOCKERFILE and "git clone" not in DOCKERFILE
