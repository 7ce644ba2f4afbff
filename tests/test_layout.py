"""The code's shape: no import cycles between cpt's modules, and the README's layout names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cpt"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """cpt modules that ``path`` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cpt":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def test_no_module_imports_one_that_imports_it_back():
    mods = modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name], done)
    assert not cycles, [" -> ".join(c) for c in cycles[:5]]


# README's order, lowest first: a module imports only modules of its own level or below
LEVELS = [
    ("cpt.spec",),
    ("cpt.io",),
    ("cpt.data", "cpt.optim", "cpt.eval", "cpt.model", "cpt.pythia", "cpt.loss"),
    ("cpt.config",),
    ("cpt.run",),
    ("cpt.train", "cpt.tools", "cpt.cli"),
]


def level(module: str) -> int:
    for i, names in enumerate(LEVELS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no level of the README's order")


def test_data_flows_the_way_the_readme_says():
    mods = modules()
    upward = [
        f"{name} ({level(name)}) imports {dep} ({level(dep)})"
        for name, path in mods.items()
        if name != "cpt"
        for dep in sorted(imports(path, set(mods)))
        if dep != "cpt" and level(dep) > level(name)
    ]
    assert not upward, upward
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "`spec` <- `io` <- `data`, `optim`, `eval`, `model`, `loss` <- `config` <- `run` <- `train`" in text


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    named = set(re.findall(r"`(cpt/[\w/]+\.py)`", layout))
    files = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    assert not files - named, f"modules missing from README's layout: {sorted(files - named)}"
    assert not named - files, f"README's layout names modules that do not exist: {sorted(named - files)}"


def test_every_registry_entry_point_names_the_class_whose_key_it_is():
    """llm-foundry finds cpt's components by the keys the run plan writes (``wire``): each entry point in
    pyproject.toml must name the class that carries that key."""
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    checked = 0
    for group in ("llmfoundry_callbacks", "llmfoundry_loggers", "llmfoundry_models"):
        for key, target in project[group].items():
            module, _, attr = target.partition(":")
            mod = importlib.import_module(module)
            owner = mod if attr == "CptPythia" else getattr(mod, attr)
            assert owner.KEY == key, f"{target} carries the key {owner.KEY!r}, registered as {key!r}"
            checked += 1
    assert checked == 12  # 10 callbacks, 1 logger, 1 model


def test_every_registered_scheduler_is_its_schedule_under_composers_protocol():
    """llm-foundry's registry takes only ``ComposerScheduler`` subclasses; each entry point names the schedule
    that ``cpt.optim.schedules`` registers under that name (which cpt's own checks and previews use)."""
    import importlib
    import tomllib

    from composer.optim import ComposerScheduler

    from cpt.optim.schedules import SCHEDULERS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    entries = project["llmfoundry_schedulers"]
    assert set(entries) == set(SCHEDULERS)
    for key, target in entries.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert issubclass(cls, ComposerScheduler) and issubclass(cls, SCHEDULERS[key]) and cls.KEY == key
