"""``cpt sweep``: a group of runs as override files over one base config (``yamls/paper/*.yaml``).

A group file names its ``base`` (relative to itself) and ``runs: {name: {dotted.key: value}}``. A mapping
value replaces that key's whole subtree (a new scheduler or a new set of train sources), unlike a
command-line override, which merges. Each run gets ``<base run name>-<run>`` as its run name (so its own
save folder), and its full config is written to ``<out>/<run>.yaml``: the launch command names that file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from cpt import config
from cpt.spec import SAFE_NAME, ConfigError


@dataclass
class SweepRun:
    name: str
    cfg: DictConfig  # as written: interpolations (${oc.env:...} included) left for the run to resolve
    path: str  # where its config is written

    def resolved(self) -> DictConfig:
        """The config as the run will see it (for checks and previews; never written)."""
        return config.resolved(self.cfg, self.path)


def load_group(path: str, out: str) -> list[SweepRun]:
    try:
        group = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = set(group) - {"base", "runs"}
    if unknown or "base" not in group or not group.get("runs"):
        raise ConfigError(f"{path}: a sweep group has exactly 'base' and 'runs' (found {sorted(group)})")
    base = os.path.join(os.path.dirname(path), group["base"])
    if not os.path.isfile(base):
        raise ConfigError(f"{path}: base config {base} not found")
    runs = []
    for name, overrides in group["runs"].items():
        if not SAFE_NAME.fullmatch(str(name)):
            raise ConfigError(f"{path}: runs.{name}: a run name must be a plain name (letters, digits, '.', '_', '-')")
        target = os.path.join(out, f"{name}.yaml")
        if os.path.dirname(os.path.abspath(target)) != os.path.abspath(out):
            raise ConfigError(f"{path}: runs.{name}: its config would be written outside {out}")
        with open(base) as fh:
            cfg = config.compose(fh.read(), [], base)
        base_name = OmegaConf.select(cfg, "variables.run_name") or cfg.get("run_name", "run")
        config.rename(cfg, f"{base_name}-{name}")
        for key, value in (overrides or {}).items():
            OmegaConf.update(cfg, key, value, merge=False)
        run = SweepRun(name, cfg, target)
        try:
            run.resolved()
        except ConfigError as exc:
            raise ConfigError(f"{path}: runs.{name}: {exc}") from exc
        runs.append(run)
    return runs


def sweep(path: str, out: str | None, gpus: int, dry_run: bool, png: str | None = None) -> list[SweepRun]:
    group = os.path.splitext(os.path.basename(path))[0]
    out = out or os.path.join("sweeps", group)
    runs = load_group(path, out)
    previews = []
    for run in runs:
        if dry_run:
            from cpt.tools.schedule import describe, preview

            previews.append(preview(config.check(run.resolved(), f"{path}: runs.{run.name}"), run.name))
            print(describe(previews[-1]))
        os.makedirs(out, exist_ok=True)
        OmegaConf.save(run.cfg, run.path)
        print(f"{run.name}: {config.launch_command(run.path, gpus)}")
    if png and previews:
        from cpt.tools.schedule import write_png

        write_png(previews, png)
        print(f"wrote {png}")
    return runs
