"""The continual pre-training run: a train YAML -> a run plan -> llm-foundry's ``train()``.

    composer -n 8 -m cpt.train yamls/pythia-410m/cpt.yaml [key=value ...]
    cpt train yamls/tiny-cpu.yaml [key=value ...]

Everything that can fail (keys, units, paths, manifests, sequence lengths, batch sizes) is checked into the
plan (``cpt.run.plan``) before the model is built. The run starts from the base weights only (fresh
optimizer, clock at 0), or, when its save folder holds a checkpoint, resumes from the newest intact one
(``cpt.run.checkpoints``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

from cpt import config
from cpt.io import redact, storage, untrusted
from cpt.run import cleanup, cpu, fingerprint, lock, record
from cpt.run.plan import Plan

log = logging.getLogger(__name__)


def train_from_yaml(path: str, overrides: list[str] | None = None):
    from llmfoundry.command_utils import train

    logging.basicConfig(format="%(asctime)s: %(levelname)s: %(name)s: %(message)s")
    logging.getLogger("cpt").setLevel(logging.INFO)
    # llm-foundry announces an autoresume default it never applies here (cpt sets autoresume: false)
    logging.getLogger("llmfoundry.command_utils.train").addFilter(
        lambda record: "changing autoresume default" not in record.getMessage()
    )
    sys.argv[1:] = redact.overrides(sys.argv[1:])  # loggers that record the command line (W&B) see no secret
    checked = config.check(config.load(path, overrides), path)
    cpu.share_cores()  # ranks on one CPU node split its cores
    save, rank0 = checked.save_folder, os.environ.get("RANK", "0") == "0"
    storage.set_retry_limit(checked.section.s3_retry_s)  # every S3 call of this process, the lock's included
    if save and rank0:
        record.check_owner(save, checked.run_name, path)  # a folder is one run's
        lock.acquire(save)  # before any download: a second launch is refused at once
    try:
        plan = Plan.from_checked(checked)  # model, data, tasks and the resume point, all checked
        if plan.finished:
            print(
                f"{checked.run_name}: already trained to max_duration ({checked.total_batches} batches, "
                f"{plan.resume.name})"
            )
            if save and rank0:
                lock.release(save)
            return None
        if save:
            if rank0:
                record.write_run_spec(save, path, overrides or [], checked.run_name)  # after every check passed
            cleanup.mark(save)  # every process this rank spawns carries it
        if os.environ.get("LOCAL_RANK", "0") == "0":
            if save:
                cleanup.reap(save)  # a killed launch's spawned helpers
            if plan.staging:
                shutil.rmtree(plan.staging, ignore_errors=True)  # a killed run's partial or unsent saves
            cleanup.clean_stale()  # a killed run's /dev/shm segments, which would block this one; live runs' stay
            cleanup.clean_lock_files()  # and the lock files streaming leaves in the temp folder, of dead prefixes
        log.info("%s", plan.describe())
        trainer = train(plan.to_foundry())
        cleanup.clean_lock_files()  # older than a minute: never one a run starting now still needs
        return trainer
    except BaseException:
        if save and rank0:
            try:
                lock.release(save)  # a refused or failed launch leaves the folder free
            except Exception as exc:  # noqa: BLE001 - the error that stopped the run is the one to show
                log.warning("could not release the run lock in %s: %s", save, exc)
        raise


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line: a CPU run keeps freed memory (cpt.run.cpu)
        cpu.apply_on_cpu()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m cpt.train CONFIG.yaml [key=value ...]", file=sys.stderr)
        return 2
    try:
        train_from_yaml(argv[0], argv[1:])
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (fingerprint.FingerprintError, untrusted.UntrustedError) as exc:  # raised inside Composer's load, too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except lock.RunLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except storage.StorageError as exc:  # a bucket that cannot be reached or written, named
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        if not cleanup.is_streaming_segment(exc.filename or ""):
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
