"""The leaf types of a train YAML: the strict ``cpt:`` section as dataclasses, and ``ConfigError``.

Nothing of cpt's is imported here, so every module (data, evaluation, schedules, the run) can name these types
without pulling in the checks of ``cpt.config``, storage or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LOSS_IMPLS = ("auto", "plain", "chunked", "liger")  # cpt.loss.impl (cpt.loss implements them)
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a run name becomes a folder name in several places


class ConfigError(ValueError):
    """A bad config: the message names the file and the key."""


@dataclass
class Source:
    """One training stream: an MDS split written by ``convert/`` and its share of the mixture."""

    path: str
    proportion: float = 1.0


@dataclass
class EvalDataset:
    path: str  # an MDS split with a manifest.json, e.g. s3://bucket/pile/val
    blends: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {domain: weight}


TASK_KINDS = ("language_modeling", "multiple_choice", "schema")


@dataclass
class Task:
    """A zero- or few-shot task (``cpt.eval.tasks.<name>``): a JSONL file in llm-foundry's ICL format."""

    path: str  # local or s3://
    kind: str  # language_modeling (context, continuation), multiple_choice (query, choices, gold), schema
    fewshot: int = 0  # examples from the same file put before each question
    examples: int | None = None  # examples scored per evaluation (the file's first ones); None: all


@dataclass
class Early:
    """``cpt.eval.early``: evaluate every ``interval`` during the run's first stretch (``until``), whatever the
    schedule, so that runs with and without a warmup are sampled alike."""

    until: str  # e.g. 0.25dur, 500ba
    interval: str  # e.g. 2ba


@dataclass
class Eval:
    datasets: dict[str, EvalDataset] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)  # task accuracy, at every tasks_every-th evaluation
    tasks_every: int = 1  # tasks at every Nth evaluation of perplexity, and always at the first and the last
    tokens_per_domain: int | None = None  # budget per domain per evaluation; None: the whole domain
    interval: str = "1000ba"  # every N batches
    early: Early | None = None  # denser in the run's first stretch
    at_peak: bool = True  # once when the warmup ends
    first: bool = True  # before the first step


@dataclass
class Loss:
    """The training loss (``cpt.loss``): ``auto``, ``plain`` (full logits), ``chunked`` or ``liger``."""

    impl: str = "auto"  # auto: liger on CUDA when installed, else chunked on CUDA; plain on the CPU
    chunk: int = 8192  # tokens whose logits are held at once (chunked)


CARRY = ("optimizer", "clock", "data")


@dataclass
class Init:
    """``cpt.init``: start from an earlier stage's checkpoint instead of the base weights, carrying what it says.

    ``carry: []`` is weights only (the paper's set-up); ``[optimizer]`` adds the optimizer's state;
    ``[optimizer, clock]`` the schedule clock too (an infinite schedule's constant phase continues across
    tasks, without a new warmup); ``[optimizer, clock, data]`` the data position as well (an anneal branch)."""

    from_: str  # YAML key "from": a save folder (its newest intact checkpoint) or one checkpoint, local or s3://
    carry: list[str] = field(default_factory=list)


@dataclass
class Cpt:
    """The ``cpt:`` section of a train YAML."""

    model: str  # a Pythia (GPT-NeoX) Hugging Face folder, local or s3://
    train: dict[str, Source]
    # Paper set-up: the base model's weights only, a fresh optimizer and a schedule clock at 0.
    from_scratch: bool = False  # same architecture, random initialisation (the from-scratch baseline)
    eval: Eval = field(default_factory=Eval)
    loss: Loss = field(default_factory=Loss)
    init: Init | None = None  # an earlier stage's checkpoint to start from (the save folder's own comes first)
    num_canonical_nodes: int = 1  # pinned, so the data order does not depend on the number of GPUs
    shuffle_seed: int = 17
    num_workers: int | None = None  # data loader workers per rank; None: min(8, the CPUs this process may use)
    run_dir: str = "runs"  # local: <run_dir>/<run_name>/ holds metrics.jsonl and caches
    allow_fingerprint_change: bool = False  # resume onto different data anyway
    keep_checkpoints: int = 3  # newest checkpoints kept in save_folder (0: all); Composer never deletes remote ones
    s3_retry_s: float = 600.0  # an S3 outage longer than this fails the upload or download, naming it
    log_samples: bool = False  # <run_dir>/<run>/samples-rank<r>.jsonl: a digest of every sample trained
    trust_remote_code: bool = False  # run a model folder's own code (config.json auto_map); off: refused
