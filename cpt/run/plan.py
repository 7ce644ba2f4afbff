"""The run plan: a train YAML checked once into a frozen, typed plan, and ``to_foundry()``, llm-foundry's config.

``Plan.from_config`` does every check that needs the model folder, the manifests or the save folder, after
``cpt.config.check`` did those that need none of them. Everything later (``cpt.train``, benchmarks, tests)
reads the plan's fields; llm-foundry's config is an output, never read back.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from cpt import config, model
from cpt.config import Checked, ConfigError
from cpt.data import mixture
from cpt.data.manifest import Manifest
from cpt.eval import domains, tasks
from cpt.io import redact, safe_load, storage
from cpt.io.cache import cache_dir
from cpt.run import checkpoints, faults, mfu, stage
from cpt.run import fingerprint as fingerprints
from cpt.run.checkpoints import Checkpoint
from cpt.run.faults import Faults
from cpt.run.fingerprint import FingerprintGuard, fingerprint
from cpt.run.lock import RunLock
from cpt.run.metrics_log import ConfigLog, MetricsJSONL
from cpt.run.samples import SampleLog
from cpt.run.upload import CheckpointUpload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    checked: Checked  # the YAML, its cpt: section, the scheduler and its clock, save folder, sharded or not
    model_dir: str  # a local Hugging Face folder (an s3:// one is copied into the cache)
    model_config: dict
    train_manifests: dict[str, Manifest]
    eval_manifests: dict[str, Manifest]
    task_files: dict[str, str]  # cpt.eval.tasks: each task's checked local JSONL
    fingerprint: str  # of the training data (sources, proportions, manifests)
    run_dir: str  # local: metrics.jsonl, sample log
    cache: str  # local: the run's downloads (data, checkpoints to resume from)
    staging: str | None  # where Composer saves before cpt uploads (s3:// save folder, or sharded checkpoints)
    resume: Checkpoint | None  # the checkpoint to resume from, its name a local path; None: base weights only
    init: Checkpoint | None  # cpt.init's checkpoint, a local path (only when there is nothing to resume)
    icl_seq_len: int | None = None  # what task examples are padded to (the longest, not max_seq_len), if shorter

    @classmethod
    def from_config(cls, cfg: DictConfig, path: str = "config") -> Plan:
        """Check a loaded train YAML against its model, data and save folder. Raises ``ConfigError``."""
        return cls.from_checked(config.check(cfg, path))

    @classmethod
    def from_checked(cls, checked: Checked) -> Plan:
        """The plan of a checked YAML: its model folder, manifests, task files and resume point fetched and checked
        (``cpt.train`` takes the run's lock before, so that a second launch is refused before any download)."""
        path, section = checked.path, checked.section
        storage.set_retry_limit(section.s3_retry_s)  # every S3 call of this process from here on
        try:
            model_dir = model.resolve_folder(section.model)
            model.check_folder(model_dir, section.model, section.trust_remote_code, not section.from_scratch)
            model_config = model.read_config(model_dir)
        except (ValueError, OSError, storage.StorageError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if checked.seq_len > model_config.get("max_position_embeddings", checked.seq_len):
            raise ConfigError(
                f"{path}: max_seq_len={checked.seq_len} is longer than the model's max_position_embeddings="
                f"{model_config['max_position_embeddings']} ({section.model})"
            )
        train = mixture.read_manifests({k: s.path for k, s in section.train.items()}, checked.seq_len, "cpt.train")
        evals = mixture.read_manifests(
            {k: d.path for k, d in section.eval.datasets.items()}, checked.seq_len, "cpt.eval.datasets"
        )
        vocab = model_config.get("vocab_size", 0)
        for where, found in (("cpt.train", train), ("cpt.eval.datasets", evals)):  # one name may be in both
            for name, m in found.items():
                if m.vocab_size > vocab:
                    raise ConfigError(
                        f"{path}: {where}.{name} has token ids up to {m.vocab_size} but the model's vocab_size is "
                        f"{vocab}"
                    )
        domains.blend_weights(section, evals)  # a blend naming an unknown domain fails now
        cache = run_cache(checked)
        task_files = tasks.prepare(section.eval.tasks)  # a missing or malformed task file fails now
        _, longest = tasks.measure(section.eval.tasks, task_files, model_dir, checked.seq_len)
        padded = tasks.padded_length(section.eval.tasks, longest, checked.seq_len)
        icl_seq_len = padded if padded < checked.seq_len else None
        if icl_seq_len:
            log.info("task examples are padded to %d tokens (the longest has %d), not max_seq_len=%d",
                     padded, max(longest.values()), checked.seq_len)  # fmt: skip
        save = checked.save_folder
        staged = bool(save) and (storage.is_s3(save) or checked.sharded)
        resume = _resume_point(save, cache, path)
        init = _init_point(checked, cache, path) if resume is None and section.init else None
        data = fingerprint(section, train)
        if resume is not None and not resume.sharded:  # before the lock and the record, not inside Composer's load
            state = safe_load.load(resume.name, mmap=True).get("state", {})
            fingerprints.check(fingerprints.stored(state), data, section.allow_fingerprint_change, resume.name)
        return cls(
            checked=checked,
            model_dir=model_dir,
            model_config=model_config,
            train_manifests=train,
            eval_manifests=evals,
            task_files=task_files,
            fingerprint=data,
            run_dir=os.path.join(section.run_dir, checked.run_name),
            cache=cache,
            staging=os.path.join(cache, "staging") if staged else None,
            resume=resume,
            init=init,
            icl_seq_len=icl_seq_len,
        )

    @property
    def finished(self) -> bool:
        """The newest checkpoint is already at ``max_duration``: nothing is left to train."""
        return self.resume is not None and self.resume.batch >= self.checked.total_batches

    def to_foundry(self) -> DictConfig:
        """llm-foundry's train config: the YAML without ``cpt:``, plus each component's slice (``wire``)."""
        checked, section = self.checked, self.checked.section
        out = copy.deepcopy(checked.cfg)
        del out["cpt"]
        out.merge_with(model.foundry_slice(self.model_dir, checked.seq_len, section))
        out.train_loader = mixture.train_loader(section, checked.seq_len, self.cache)
        out.scheduler.tokens_per_batch = checked.clock.tokens_per_batch  # derived once, in config.check
        callbacks = dict(out.get("callbacks") or {})
        self._evaluation(out, callbacks)
        self._checkpoints(out, callbacks)
        self._start(out, callbacks)
        out.loggers = self._loggers(dict(out.get("loggers") or {}))
        if faults.planned():
            callbacks.update(wire(Faults, save_folder=out.get("save_folder")))
        if section.log_samples:
            callbacks.update(wire(SampleLog, folder=self.run_dir))
        peak = mfu.current_peak(str(checked.cfg.get("precision", "fp32")))
        if peak:  # MFU in every run on a known GPU (Composer's own table misses some)
            monitor = dict(callbacks.get("speed_monitor") or {"window_size": 10})
            monitor.setdefault("gpu_flops_available", peak)
            callbacks["speed_monitor"] = monitor
        callbacks.update(
            wire(FingerprintGuard, fingerprint=self.fingerprint, allow_change=section.allow_fingerprint_change)
        )
        out.log_config = False  # llm-foundry's prints every resolved value: cpt_config_log masks secrets
        out.callbacks = callbacks
        shown = OmegaConf.to_container(out, resolve=True)
        out.callbacks.update(wire(ConfigLog, config=redact.config({**shown, "cpt": self._section_shown()})))
        if self.resume is None and self.init is not None and "clock" in section.init.carry:
            out.callbacks.update(wire(stage.StageStart, batch=self.init.batch))  # last: a stage's start, evaluated
        return out

    def _evaluation(self, out: DictConfig, callbacks: dict) -> None:
        section = self.checked.section
        if section.eval.datasets:
            out.eval_loaders = domains.eval_loaders(section, self.eval_manifests, self.checked.seq_len, self.cache)
            callbacks.update(wire(domains.DomainMetrics, blends=domains.blend_weights(section, self.eval_manifests)))
        if section.eval.tasks:
            out.icl_tasks = tasks.icl_tasks(section, self.task_files)
            if self.icl_seq_len and not out.get("icl_seq_len"):  # the YAML's own value wins
                out.icl_seq_len = self.icl_seq_len  # llm-foundry pads every example to it: the longest, not 2048
        if section.eval.datasets or section.eval.tasks:
            out.eval_first = section.eval.first
            callbacks.update(wire(domains.EvalCadence, **cadence(self.checked)))

    def _checkpoints(self, out: DictConfig, callbacks: dict) -> None:
        checked, save = self.checked, self.checked.save_folder
        out.autoresume = False  # cpt's resume rule (cpt.run.checkpoints), for monolithic and sharded alike
        if not save:
            return
        out.save_folder = self.staging or save  # Composer writes locally; CheckpointUpload uploads
        out.save_filename = checkpoints.SAVE_FILENAME
        out.save_num_checkpoints_to_keep = -1  # trimming is CheckpointUpload's (cpt.keep_checkpoints)
        if checked.sharded:
            out.fsdp_config.sharded_ckpt_prefix_dir = checkpoints.SHARDED_PREFIX
        keep = checked.section.keep_checkpoints
        callbacks.update(
            wire(CheckpointUpload, save_folder=save, staging=self.staging, keep=keep, sharded=checked.sharded)
        )
        callbacks.update(wire(RunLock, save_folder=save))

    def _start(self, out: DictConfig, callbacks: dict) -> None:
        """Where the weights come from: the run's own newest checkpoint, else ``cpt.init``'s, else the base."""
        checked = self.checked
        if self.resume is not None:
            out.load_path = self.resume.name  # the whole state: weights, optimizer, clock, data position, RNG
        elif self.init is not None:
            carry = checked.section.init.carry
            out.load_path = self.init.name  # an earlier stage's checkpoint: only what cpt.init carries
            if carry:
                out.load_ignore_keys = stage.ignore_keys(carry)
            else:
                out.load_weights_only = True
            if "optimizer" in carry:  # the old stage's LR comes with it: this stage's, at its first batch
                first = float(self.init.batch if "clock" in carry else 0)
                multiplier = checked.scheduler.multiplier(first, checked.clock)
                callbacks.update(wire(stage.StageLR, lr=checked.lr, multiplier=multiplier))

    def _loggers(self, loggers: dict) -> dict:
        save = self.checked.save_folder
        if "mlflow" in loggers:
            # Composer's MLflow logger drops a value equal to the previous one for 100 steps: an accuracy that
            # holds still would lose its points. Every evaluation is kept unless the YAML says otherwise.
            loggers["mlflow"] = {"log_duplicated_metric_every_n_steps": 1, **(loggers["mlflow"] or {})}
        wandb_dir = ((loggers.get("wandb") or {}).get("init_kwargs") or {}).get("dir")
        if wandb_dir and not storage.is_s3(str(wandb_dir)):
            os.makedirs(str(wandb_dir), exist_ok=True)  # W&B falls back to the system's temp folder when it is missing
        remote = save if save and storage.is_s3(save) else None
        loggers.update(wire(MetricsJSONL, path=os.path.join(self.run_dir, "metrics.jsonl"), remote=remote))
        return loggers

    def _section_shown(self) -> dict:
        return OmegaConf.to_container(self.checked.cfg.cpt, resolve=True)

    def describe(self) -> str:
        """One line for the log: what this launch does."""
        where = self.checked.save_folder or "no save folder"
        start = f"resumes from batch {self.resume.batch}" if self.resume else "starts from the base weights"
        return f"{self.checked.run_name}: {start} ({self.model_dir}); checkpoints in {where}"


def run_cache(checked: Checked) -> str:
    """The run's local cache: its name and where it saves (or its YAML), so two projects' runs of one name never
    share downloads."""
    where = checked.save_folder or os.path.abspath(checked.path)
    return cache_dir("runs", f"{checked.run_name}-{hashlib.sha256(where.encode()).hexdigest()[:8]}")


def wire(component: type, **kwargs) -> dict:
    """``{component.KEY: kwargs}``: one component's slice of llm-foundry's config, its arguments bound to its
    constructor here (a mismatch fails at planning, naming the class, not inside llm-foundry)."""
    try:
        inspect.signature(component).bind(**kwargs)
    except TypeError as exc:
        raise TypeError(f"{component.__name__} ({component.KEY}): {exc}") from None
    return {component.KEY: kwargs}


def cadence(checked: Checked) -> dict:
    """``EvalCadence``'s arguments (``cpt_eval_cadence``): the cadence in batches, each evaluator's budget."""
    section = checked.section
    clock, warmup_end, early = checked.clock, checked.warmup_end, section.eval.early
    return {
        "interval": math.ceil(clock.batches(section.eval.interval, "cpt.eval.interval")),
        "early_until": int(clock.batches(early.until, "cpt.eval.early.until")) if early else 0,
        "early_interval": math.ceil(clock.batches(early.interval, "cpt.eval.early.interval")) if early else None,
        "peak": warmup_end if section.eval.at_peak and warmup_end > 0 else None,
        "subset_num_batches": domains.subset_batches(
            section.eval.tokens_per_domain,
            checked.seq_len,
            int(checked.cfg.get("device_eval_batch_size", 8)),
            int(os.environ.get("WORLD_SIZE", "1")),
        ),
        "task_examples": tasks.examples_per_label(section),
        "tasks_every": section.eval.tasks_every,
    }


def _resume_point(save_folder: str | None, cache: str, path: str) -> Checkpoint | None:
    if not save_folder:
        return None
    try:
        return checkpoints.find_resume(save_folder, os.path.join(cache, "checkpoints"))
    except (ValueError, storage.StorageError) as exc:  # an unsafe checkpoint, or too many broken ones
        raise ConfigError(f"{path}: save_folder: {exc}") from exc


def _init_point(checked: Checked, cache: str, path: str) -> Checkpoint:
    """cpt.init's checkpoint, fetched and checked, and its clock checked against this run's schedule."""
    init = checked.section.init
    where = os.path.join(cache, "init")
    try:
        if checkpoints.batch_of(os.path.basename(init.from_.rstrip("/"))) is not None:
            ck = checkpoints.fetch(init.from_, where)
        else:
            ck = checkpoints.find_resume(init.from_, where, verb="starting this stage from", own=False)
    except (ValueError, storage.StorageError) as exc:
        raise ConfigError(f"{path}: cpt.init.from: {exc}") from exc
    if ck is None:
        raise ConfigError(f"{path}: cpt.init.from: {init.from_} holds no intact checkpoint")
    if "clock" in init.carry:
        name = str(checked.cfg.scheduler.get("name"))
        stage.check_clock(ck.batch, checked.total_batches, checked.scheduler.phases(checked.clock), name, path)
    return ck
