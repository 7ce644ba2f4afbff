"""The continual pre-training run: a train YAML -> checks -> llm-foundry's config -> llm-foundry's ``train()``.

    composer -n 8 -m cpt.train yamls/pythia-410m/cpt.yaml [key=value ...]
    cpt train yamls/tiny-cpu.yaml [key=value ...]

Everything that can fail (keys, units, paths, manifests, sequence lengths, batch sizes) is checked before
the model is built. The run starts from the base weights only (fresh optimizer, clock at 0), or, when its
``save_folder`` already holds a checkpoint, resumes from it (llm-foundry's ``autoresume``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import sys

from omegaconf import DictConfig

from cpt import config as C
from cpt import faults, orphans, resume, shm, storage
from cpt import model as M
from cpt.cache import cache_dir
from cpt.data import mixture
from cpt.eval import domains
from cpt.optim.preview import scheduler_from_config

log = logging.getLogger(__name__)


def expand(cfg: DictConfig, path: str = "config") -> DictConfig:
    """The llm-foundry config for a cpt train YAML. Raises ``ConfigError`` naming the key or path."""
    section = C.check(cfg, path)
    out = copy.deepcopy(cfg)
    del out["cpt"]
    run_name = str(C.require(cfg, "run_name", path))
    seq_len = int(cfg.max_seq_len)
    run_dir = os.path.join(section.run_dir, run_name)
    cache = cache_dir("runs", run_name)

    try:
        model_dir = M.resolve_folder(section.model)
    except (FileNotFoundError, OSError) as exc:
        raise C.ConfigError(f"{path}: {exc}") from exc
    model_cfg = M.read_config(model_dir)
    if seq_len > model_cfg.get("max_position_embeddings", seq_len):
        raise C.ConfigError(
            f"{path}: max_seq_len={seq_len} is longer than the model's max_position_embeddings="
            f"{model_cfg['max_position_embeddings']} ({section.model})"
        )

    train_manifests = mixture.read_manifests({k: s.path for k, s in section.train.items()}, seq_len, "cpt.train")
    eval_manifests = mixture.read_manifests(
        {k: d.path for k, d in section.eval.datasets.items()}, seq_len, "cpt.eval.datasets"
    )
    vocab = model_cfg.get("vocab_size", 0)
    for name, m in {**train_manifests, **eval_manifests}.items():
        if m.vocab_size > vocab:
            raise C.ConfigError(
                f"{path}: dataset {name} has token ids up to {m.vocab_size} but the model's vocab_size is {vocab}"
            )

    out.model = {
        "name": "cpt_pythia",
        "pretrained_model_name_or_path": model_dir,
        "pretrained": not section.from_scratch,  # weights only: optimizer and clock start fresh
        "attn_implementation": "sdpa",
        "use_flash_attention_2": False,
        "use_train_metrics": False,  # the train loss is logged anyway; metrics on 50k-vocab logits cost a pass
    }
    out.tokenizer = {"name": model_dir, "kwargs": {"model_max_length": seq_len, "pad_token": "<|padding|>"}}
    out.train_loader = mixture.train_loader(section, seq_len, cache)

    scheduler, clock = scheduler_from_config(cfg, path)
    out.scheduler.tokens_per_batch = clock.tokens_per_batch
    callbacks = dict(out.get("callbacks") or {})
    if section.eval.datasets:
        out.eval_loaders = domains.eval_loaders(section, eval_manifests, seq_len, cache)
        out.eval_first = section.eval.first
        phases = scheduler.phases(clock)
        warmup_end = math.ceil(phases[1][1]) if len(phases) > 1 else 0
        world = int(os.environ.get("WORLD_SIZE", "1"))
        callbacks["cpt_eval_cadence"] = {
            "interval": math.ceil(clock.batches(section.eval.interval, "cpt.eval.interval")),
            "warmup_interval": (
                math.ceil(clock.batches(section.eval.warmup_interval, "cpt.eval.warmup_interval"))
                if section.eval.warmup_interval
                else None
            ),
            "warmup_end": warmup_end,
            "peak": warmup_end if section.eval.at_peak and warmup_end > 0 else None,
            "subset_num_batches": domains.subset_batches(
                section.eval.tokens_per_domain, seq_len, int(cfg.get("device_eval_batch_size", 8)), world
            ),
        }
        callbacks["cpt_domain_metrics"] = {"blends": domains.blend_weights(section, eval_manifests)}
    save_folder = cfg.get("save_folder")
    loggers = dict(out.get("loggers") or {})
    loggers["cpt_jsonl"] = {
        "path": os.path.join(run_dir, "metrics.jsonl"),
        "remote": save_folder if save_folder and str(save_folder).startswith("s3://") else None,
    }
    out.loggers = loggers

    if cfg.get("load_path"):
        raise C.ConfigError(
            f"{path}: load_path restores an optimizer and an old LR; a CPT run loads the base "
            "weights from cpt.model, and resumes from save_folder by itself"
        )
    sharded = (cfg.get("fsdp_config") or {}).get("state_dict_type") == "sharded"
    out.autoresume = bool(save_folder) and sharded  # sharded checkpoints: Composer's own autoresume
    if save_folder and not sharded:
        save_folder = str(save_folder)
        resume_from = resume.find_resume(save_folder, os.path.join(cache, "checkpoints"))
        if resume_from:
            out.load_path = resume_from  # the whole state: weights, optimizer, clock, data position, RNG
        staging = os.path.join(cache, "staging") if storage.is_s3(save_folder) else None
        out.save_folder = staging or save_folder  # Composer writes locally; cpt_checkpoint_upload uploads
        out.save_num_checkpoints_to_keep = -1  # trimming is cpt_checkpoint_upload's (cpt.keep_checkpoints)
        callbacks["cpt_checkpoint_upload"] = {
            "save_folder": save_folder,
            "staging": staging,
            "keep": section.keep_checkpoints,
        }
    if save_folder:
        callbacks["cpt_run_lock"] = {"save_folder": str(save_folder)}
    if faults.planned():
        callbacks["cpt_faults"] = {"save_folder": out.get("save_folder")}
    if section.log_samples:
        callbacks["cpt_sample_log"] = {"folder": run_dir}
    callbacks["cpt_fingerprint"] = {
        "fingerprint": mixture.fingerprint(section, train_manifests),
        "allow_change": section.allow_fingerprint_change,
    }
    out.callbacks = callbacks
    return out


def train_from_yaml(path: str, overrides: list[str] | None = None):
    from llmfoundry.command_utils import train

    logging.basicConfig(format="%(asctime)s: %(levelname)s: %(name)s: %(message)s")
    logging.getLogger("cpt").setLevel(logging.INFO)
    cfg = C.load(path, overrides)
    os.environ[storage.RETRY_ENV] = str(C.check(cfg, path).s3_retry_s)  # for every S3 call of this run
    expanded = expand(cfg, path)
    if expanded.get("load_path"):
        batch = resume.batch_of(expanded.load_path)
        total = math.ceil(scheduler_from_config(cfg, path)[1].batches("1dur", "max_duration"))
        if batch >= total:
            print(f"{cfg.run_name}: already trained to max_duration ({total} batches, {expanded.load_path})")
            return None
    callbacks = expanded.get("callbacks") or {}
    uploads = callbacks.get("cpt_checkpoint_upload") or {}
    save_folder = (callbacks.get("cpt_run_lock") or {}).get("save_folder")
    if save_folder:
        if os.environ.get("RANK", "0") == "0":
            resume.acquire(save_folder)  # before anything is written to the save folder
        orphans.mark(save_folder)  # every process this rank spawns carries it
    if os.environ.get("LOCAL_RANK", "0") == "0":
        if save_folder:
            orphans.reap(save_folder)  # a killed launch's upload workers
        if uploads.get("staging"):
            shutil.rmtree(uploads["staging"], ignore_errors=True)  # a killed run's partial or unsent saves
        shm.clean_stale()  # a killed run's /dev/shm segments, which would block this one; live runs' stay
    log.info("expanded %s for llm-foundry", path)
    return train(expanded)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m cpt.train CONFIG.yaml [key=value ...]", file=sys.stderr)
        return 2
    try:
        train_from_yaml(argv[0], argv[1:])
    except C.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except resume.RunLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except FileExistsError as exc:
        if not shm.is_streaming_segment(exc.filename or ""):
            raise
        print(
            f"error: shared memory {exc.filename} exists: another run on this host started at the same moment and "
            "took the same mosaicml-streaming prefix. Nothing was trained; relaunch the same command",
            file=sys.stderr,
        )
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
