"""The train YAML: llm-foundry's keys plus one strict ``cpt:`` section, checked into a ``Checked`` config.

A train YAML is what ``cpt train``, ``composer -m cpt.train``, ``cpt schedule`` and ``cpt sweep`` all read,
with the same ``key=value`` overrides (OmegaConf dot-list, as llm-foundry's own train script takes).
``cpt`` owns ``model``, ``tokenizer``, ``train_loader``, ``eval_loaders`` and the checkpoint keys (names,
resume, trimming): it builds them from the ``cpt:`` section. Every other top-level key must be one of
llm-foundry's ``TrainConfig`` fields. ``check`` is everything that needs no data, model or bucket; the run
plan (``cpt.run.plan``) adds what does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf

from cpt.io import redact, storage
from cpt.optim import schedules
from cpt.spec import CARRY, SAFE_NAME, TASK_KINDS, ConfigError, Cpt, Task
from cpt.spec import LOSS_IMPLS as IMPLS

# llm-foundry 0.22.0's ``TrainConfig`` fields, written out so that checking a config does not import llm-foundry
# (6 s); tests/test_train_config.py compares them with the dataclass
FOUNDRY_KEYS = frozenset(
    """accumulate_train_batch_on_tokens algorithms autoresume callbacks code_paths compile_config console_log_interval
    cuda_load_lazy device_eval_batch_size device_train_batch_size device_train_grad_accum device_train_microbatch_size
    dist_timeout eval_first eval_gauntlet eval_gauntlet_str eval_interval eval_loader eval_loaders
    eval_subset_num_batches expandable_segments flatten_metadata fsdp_config global_train_batch_size icl_seq_len
    icl_subset_num_batches icl_tasks icl_tasks_str load_ignore_keys load_path load_strict_model_weights
    load_weights_only log_config log_to_console loggers max_duration max_seq_len max_split_size_mb metadata model
    n_gpus only_composer_checkpoint only_hf_checkpoint optimizer precision profiler progress_bar python_log_level
    run_name save_filename save_folder save_ignore_keys save_interval save_latest_filename
    save_num_checkpoints_to_keep save_overwrite save_weights_only scheduler seed spin_dataloaders tokenizer tp_config
    train_loader train_subset_num_batches variables""".split()
)
OWNED = ("model", "tokenizer", "train_loader", "eval_loader", "eval_loaders")
REFUSED = {  # llm-foundry keys that cpt decides itself, and why
    "save_filename": "save_filename is cpt's (cpt.run.checkpoints names checkpoints, so that resume, upload and "
    "pruning find them)",
    "save_num_checkpoints_to_keep": "save_num_checkpoints_to_keep is cpt's: set cpt.keep_checkpoints",
    "autoresume": "autoresume is cpt's: a run resumes from save_folder by itself whenever it holds a checkpoint",
    "log_config": "log_config is cpt's: the run prints and logs its config with secrets masked",
    "load_path": "load_path restores an optimizer and an old LR; a CPT run loads the base weights from cpt.model, "
    "and resumes from save_folder by itself",
}


@dataclass(frozen=True)
class Checked:
    """A train YAML checked without touching data, models or buckets: what every command agrees on."""

    cfg: DictConfig  # the resolved YAML, as written (cpt: included)
    path: str
    section: Cpt
    run_name: str
    seq_len: int
    global_batch: int
    lr: float
    scheduler: schedules.Schedule
    clock: schedules.Clock
    save_folder: str | None
    sharded: bool  # fsdp_config.state_dict_type: sharded, on more than one rank

    @property
    def total_batches(self) -> int:
        return math.ceil(self.clock.batches(self.clock.max_duration, "max_duration"))

    @property
    def warmup_end(self) -> int:
        """The first batch after the warmup (0 when the schedule has none)."""
        phases = self.scheduler.phases(self.clock)
        return math.ceil(phases[1][1]) if len(phases) > 1 else 0


def _coerce(tp, value, where: str):
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, where)
    if origin is list:
        (it,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(it, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    args = get_args(tp)
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_mapping(cls, data: dict, where: str):
    """A dataclass from a mapping; unknown and missing keys are errors that name the key."""
    hints = get_type_hints(cls)
    keys = {f.name.rstrip("_"): f for f in dataclasses.fields(cls)}  # a field from_ is the key "from"
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(keys))})")
    kwargs = {}
    for key, f in keys.items():
        if key in data:
            kwargs[f.name] = _coerce(hints[f.name], data[key], f"{where}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {where}.{key}")
    return cls(**kwargs)


def load(path: str, overrides: list[str] | None = None) -> DictConfig:
    """Read a YAML and apply ``key=value`` overrides; interpolations resolved."""
    if not os.path.isfile(path):
        raise ConfigError(f"config not found: {path}")
    with open(path) as fh:
        return resolved(compose(fh.read(), overrides, path), path)


def compose(text: str, overrides: list[str] | None, where: str) -> DictConfig:
    """The one YAML loader (``cpt train``, ``cpt sweep``, ``cpt anneal``): a YAML's text with ``key=value``
    overrides merged in, interpolations left as they are; ``ConfigError`` naming ``where``."""
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"{where}: override {bad[0]!r} is not key=value")
    try:
        cfg = OmegaConf.merge(OmegaConf.create(text), OmegaConf.from_dotlist(list(overrides or [])))
    except Exception as exc:  # omegaconf's and yaml's errors name the key or the line; add the file
        raise ConfigError(f"{where}: {' '.join(str(exc).split())}"[:500]) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{where}: the top level must be a mapping")
    return cfg


def resolved(cfg: DictConfig, where: str) -> DictConfig:
    """A resolved copy of ``cfg``; the interpolations are remembered so that errors name them, not their values."""
    out = copy.deepcopy(cfg)
    try:
        OmegaConf.resolve(out)
    except Exception as exc:  # noqa: BLE001 - omegaconf's errors name the key; add the file
        raise ConfigError(f"{where}: {' '.join(str(exc).split())}"[:500]) from None
    remember_interpolations(where, OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(out))
    return out


def launch_command(path: str, gpus: int) -> str:
    """The one launch command every tool prints (``cpt sweep``, ``cpt anneal``), shell-quoted to be pasted."""
    return shlex.join(["composer", "-n", str(int(gpus)), "-m", "cpt.train", path])


def rename(cfg: DictConfig, name: str) -> None:
    """Give a derived run (a sweep's, a branch) its own run name: ``variables.run_name`` when the YAML names the
    run through it (so its save folder follows), else ``run_name``."""
    if OmegaConf.select(cfg, "variables.run_name") is not None:
        cfg.variables.run_name = name
    if OmegaConf.select(cfg, "run_name", throw_on_resolution_failure=False) != name:
        cfg.run_name = name


def cpt_section(cfg: DictConfig, path: str = "config") -> Cpt:
    if "cpt" not in cfg:
        raise ConfigError(f"{path}: missing the cpt: section")
    ev = cfg.cpt.get("eval") if isinstance(cfg.cpt, DictConfig) else None
    if isinstance(ev, DictConfig) and "warmup_interval" in ev:
        raise ConfigError(
            f"{path}: cpt.eval.warmup_interval is gone: dense early evaluation is cpt.eval.early: {{until: 0.25dur, "
            "interval: 2ba}, the same for every schedule"
        )
    try:
        return from_mapping(Cpt, OmegaConf.to_container(cfg.cpt), "cpt")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def check_top_level(cfg: DictConfig, path: str = "config") -> None:
    """Every key outside ``cpt:`` must be llm-foundry's, and not one that cpt builds."""
    for key in cfg:
        if key == "cpt":
            continue
        if key in OWNED:
            raise ConfigError(f"{path}: key {key!r} is built by cpt from the cpt: section; remove it")
        if key in REFUSED and cfg[key] not in (None, False):
            raise ConfigError(f"{path}: {REFUSED[key]}; remove {key!r}")
        if key not in FOUNDRY_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (not a cpt or llm-foundry TrainConfig key)")


def require(cfg: DictConfig, key: str, path: str = "config") -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{path}: missing key {key!r}")
    return cfg[key]


_SHOWN: dict[str, dict[str, str]] = {}  # config path -> {a resolved interpolation's value: the interpolation}


def remember_interpolations(path: str, unresolved: Any, resolved: Any) -> None:
    """Note every value that came from an interpolation, so that an error names ``${...}``, never what it resolved
    to (a secret from the environment, say)."""
    shown: dict[str, str] = {}

    def walk(raw: Any, value: Any) -> None:
        if isinstance(raw, dict) and isinstance(value, dict):
            for k in raw:
                walk(raw[k], value.get(k))
        elif isinstance(raw, list) and isinstance(value, list):
            for r, v in zip(raw, value):
                walk(r, v)
        elif isinstance(raw, str) and "${" in raw and value is not None and len(str(value)) >= 3 and _hidden(raw):
            shown[str(value)] = raw

    walk(unresolved, resolved)
    _SHOWN[path] = shown


def _hidden(interpolation: str) -> bool:
    """An interpolation whose value an error must not show: a resolver's (``${oc.env:...}``, ``${oc.decode:...}``)
    or a secret-looking key's (``${variables.hf_token}``). Plain references to other keys are shown."""
    refs = re.findall(r"\$\{([^}]*)\}", interpolation)
    return any(":" in r or redact.is_secret_key(r.strip()) for r in refs)


def _scrub(message: str, path: str) -> str:
    for value, raw in sorted(_SHOWN.get(path, {}).items(), key=lambda kv: -len(kv[0])):
        message = message.replace(repr(value), raw).replace(value, raw)
    return message


def check(cfg: DictConfig, path: str = "config") -> Checked:
    """Everything that can be checked without touching data, models or buckets: keys, types, schedule, batches.
    An error names the key and, for a value that came from an interpolation, the interpolation, never its value."""
    try:
        return _check(cfg, path)
    except ConfigError as exc:
        raise ConfigError(_scrub(str(exc), path)) from None


def _check(cfg: DictConfig, path: str) -> Checked:
    check_top_level(cfg, path)
    section = cpt_section(cfg, path)
    for key in ("max_seq_len", "global_train_batch_size", "max_duration", "optimizer", "scheduler"):
        require(cfg, key, path)
    run_name = str(require(cfg, "run_name", path))
    if not section.train:
        raise ConfigError(f"{path}: cpt.train names no source")
    _check_values(cfg, section, path)
    seq_len, glob = int(cfg.max_seq_len), int(cfg.global_train_batch_size)
    for name, ds in section.eval.datasets.items():
        for blend, weights in ds.blends.items():
            if not weights or any(not _finite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ConfigError(f"{path}: cpt.eval.datasets.{name}.blends.{blend} needs non-negative weights")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = cfg.get("device_train_microbatch_size")
    if isinstance(micro, str):
        raise ConfigError(
            f"{path}: device_train_microbatch_size must be an integer ('auto' breaks FSDP on "
            f"torch >= 2.7.1), got {micro!r}"
        )
    if micro is not None and glob % (world * int(micro)):
        raise ConfigError(
            f"{path}: global_train_batch_size={glob} is not divisible by world size {world} x "
            f"device_train_microbatch_size {micro}"
        )
    fsdp = cfg.get("fsdp_config") or {}
    if fsdp.get("sharded_ckpt_prefix_dir") is not None:
        raise ConfigError(
            f"{path}: fsdp_config.sharded_ckpt_prefix_dir is cpt's (cpt.run.checkpoints names checkpoints); remove it"
        )
    scheduler, clock = _scheduler(cfg, glob * seq_len, path)
    early = section.eval.early
    for key, value in (
        ("cpt.eval.interval", section.eval.interval),
        ("cpt.eval.early.until", early and early.until),
        ("cpt.eval.early.interval", early and early.interval),
        ("save_interval", cfg.get("save_interval")),
    ):
        if value is not None:
            try:
                if clock.batches(value, key) <= 0:
                    raise ValueError(f"{key}={value!r} must be longer than zero")
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from exc
    save_folder = cfg.get("save_folder")
    return Checked(
        cfg=cfg,
        path=path,
        section=section,
        run_name=run_name,
        seq_len=seq_len,
        global_batch=glob,
        lr=float(require(cfg, "optimizer", path).get("lr", 0.0)),
        scheduler=scheduler,
        clock=clock,
        save_folder=str(save_folder) if save_folder else None,
        sharded=fsdp.get("state_dict_type") == "sharded" and world > 1,  # llm-foundry drops FSDP on one device
    )


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_values(cfg: DictConfig, section: Cpt, path: str) -> None:
    """Every value's type and range, in one place: ``ConfigError`` naming the key and the value."""

    def fail(key: str, value: Any, want: str) -> None:
        raise ConfigError(f"{path}: {key}={value!r} {want}")

    run_name = str(cfg.run_name)
    if not SAFE_NAME.fullmatch(run_name):
        fail("run_name", run_name, "must be a plain name (letters, digits, '.', '_', '-'; no '/' and no leading '.')")
    for key in ("max_seq_len", "global_train_batch_size", "device_train_microbatch_size", "device_eval_batch_size"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            if key == "device_train_microbatch_size" and isinstance(value, str):
                continue  # named below, with the reason
            fail(key, value, "must be a positive integer")
    optimizer = cfg.optimizer
    if not isinstance(optimizer, DictConfig):
        fail("optimizer", optimizer, "must be a mapping")
    lr = optimizer.get("lr")
    if not _finite(lr) or lr <= 0:
        fail("optimizer.lr", lr, "must be a positive number")
    betas = optimizer.get("betas")
    if betas is not None:
        if len(betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in betas):
            fail("optimizer.betas", list(betas), "must be two numbers in [0, 1)")
    for key in ("eps", "weight_decay"):
        value = optimizer.get(key)
        if value is not None and (not _finite(value) or value < 0):
            fail(f"optimizer.{key}", value, "must be a non-negative number")
    for name, src in section.train.items():
        if not _finite(src.proportion) or src.proportion <= 0:
            fail(f"cpt.train.{name}.proportion", src.proportion, "must be a positive number")
    urls = {f"cpt.train.{name}.path": src.path for name, src in section.train.items()}
    urls.update({f"cpt.eval.datasets.{name}.path": ds.path for name, ds in section.eval.datasets.items()})
    urls.update({"cpt.model": section.model, "save_folder": cfg.get("save_folder")})
    for key, value in urls.items():
        try:
            if value:
                storage.check_not_mistyped_url(str(value), key)
        except storage.StorageError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    tokens = section.eval.tokens_per_domain
    if tokens is not None and tokens < int(cfg.max_seq_len):
        fail("cpt.eval.tokens_per_domain", tokens, f"must be at least max_seq_len ({cfg.max_seq_len})")
    check_tasks(section.eval.tasks, path)
    for key, value, low in (
        ("cpt.num_workers", section.num_workers if section.num_workers is not None else 0, 0),
        ("cpt.keep_checkpoints", section.keep_checkpoints, 0),
        ("cpt.num_canonical_nodes", section.num_canonical_nodes, 1),
        ("cpt.eval.tasks_every", section.eval.tasks_every, 1),
    ):
        if value < low:
            fail(key, value, f"must be at least {low}")
    if section.loss.impl not in IMPLS:
        fail("cpt.loss.impl", section.loss.impl, f"must be one of {', '.join(IMPLS)}")
    if section.loss.chunk < 1:
        fail("cpt.loss.chunk", section.loss.chunk, "must be at least 1")
    if section.init is not None:
        carry = section.init.carry
        bad = [c for c in carry if c not in CARRY]
        if bad:
            fail("cpt.init.carry", carry, f"holds {bad[0]!r}: each must be one of {', '.join(CARRY)}")
        if ("clock" in carry and "optimizer" not in carry) or ("data" in carry and "clock" not in carry):
            fail("cpt.init.carry", carry, "must be [], [optimizer], [optimizer, clock] or [optimizer, clock, data]")
        if section.from_scratch:
            fail("cpt.from_scratch", True, "cannot be combined with cpt.init (which starts from a checkpoint)")
    if not _finite(section.s3_retry_s) or section.s3_retry_s <= 0:
        fail("cpt.s3_retry_s", section.s3_retry_s, "must be a positive number of seconds")


def check_tasks(tasks: dict[str, Task], path: str, where: str = "cpt.eval.tasks") -> None:
    """Each task's name, kind, shots and budget (``cpt.eval.tasks``, and ``cpt eval``'s task list)."""
    for name, task in tasks.items():
        key = f"{where}.{name}"
        problem = None
        if not SAFE_NAME.fullmatch(name):
            problem = f"{key}={name!r} must be a plain name (letters, digits, '.', '_', '-')"
        elif task.kind not in TASK_KINDS:
            problem = f"{key}.kind={task.kind!r} must be one of {', '.join(TASK_KINDS)}"
        elif task.fewshot < 0:
            problem = f"{key}.fewshot={task.fewshot!r} must be at least 0"
        elif task.examples is not None and task.examples < 1:
            problem = f"{key}.examples={task.examples!r} must be at least 1 (or null: all)"
        if problem:
            raise ConfigError(f"{path}: {problem}")
        try:
            storage.check_not_mistyped_url(task.path, f"{key}.path")
        except storage.StorageError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def _scheduler(cfg: DictConfig, tokens_per_batch: int, path: str) -> tuple[schedules.Schedule, schedules.Clock]:
    """The scheduler the YAML asks for, with ``tokens_per_batch`` filled in, checked against the run's length."""
    spec = dict(require(cfg, "scheduler", path))
    name = spec.pop("name", None)
    if "tokens_per_batch" in spec:  # derived here only: a value of the YAML's own would be silently ignored
        raise ConfigError(
            f"{path}: scheduler.tokens_per_batch is cpt's (global_train_batch_size x max_seq_len = "
            f"{tokens_per_batch}); remove it"
        )
    spec["tokens_per_batch"] = tokens_per_batch
    try:
        scheduler = schedules.make_scheduler(name, **spec)
        clock = schedules.Clock(str(require(cfg, "max_duration", path)), tokens_per_batch)
        scheduler.resolve(clock)
    except ValueError as exc:
        raise ConfigError(f"{path}: scheduler: {exc}") from exc
    return scheduler, clock
