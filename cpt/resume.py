"""The resume rule: resume from our own save folder if it holds a good checkpoint, else load base weights only.

Composer's own autoresume follows a ``latest`` pointer that is uploaded about 30 s after the checkpoint,
downloads into ``./s3:/...`` and never deletes remote checkpoints. Instead, cpt lists the save folder
(local or ``s3://``), takes the newest ``ep*-ba*-rank0.pt``, downloads it into the run's cache folder,
checks every member's CRC (a ``.pt`` is a zip file) and falls back to the previous one, with a warning, when
it is corrupt. The data fingerprint travels in the checkpoint (``FingerprintGuard``) and is checked on load.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import zipfile

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from cpt import storage

log = logging.getLogger(__name__)
CHECKPOINT = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")


def checkpoints(save_folder: str) -> list[tuple[int, str]]:
    """``(batch, name)`` of every monolithic checkpoint in the folder, newest first."""
    found = []
    for key in storage.list_prefix(save_folder):
        m = CHECKPOINT.match(key)
        if m:
            found.append((int(m.group(2)), key))
    return sorted(found, reverse=True)


def intact(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def find_resume(save_folder: str, cache: str) -> str | None:
    """A local path to the newest intact checkpoint in ``save_folder``, or None when it holds none."""
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:  # ranks on one node download once
        fcntl.flock(lock, fcntl.LOCK_EX)
        for batch, name in checkpoints(save_folder):
            url = storage.join(save_folder, name)
            local = url
            if storage.is_s3(save_folder):
                local = os.path.join(cache, name)
                if not (os.path.isfile(local) and intact(local)):
                    storage.download_file(url, local)
            if intact(local):
                log.info("resuming from %s (batch %d)", url, batch)
                return local
            log.warning("skipping corrupt checkpoint %s: a zip member fails its CRC", url)
    return None


def prune(save_folder: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints in ``save_folder``; returns what was deleted."""
    if keep <= 0:
        return []
    doomed = [name for _, name in checkpoints(save_folder)[keep:]]
    for name in doomed:
        url = storage.join(save_folder, name)
        if storage.is_s3(url):
            bucket, key = storage.split_s3(url)
            storage.s3_client().delete_object(Bucket=bucket, Key=key)
        else:
            os.remove(url)
    return doomed


class FingerprintGuard(Callback):
    """Stores the data fingerprint in every checkpoint; refuses to resume onto different data."""

    def __init__(self, fingerprint: str, allow_change: bool = False, save_folder: str | None = None, keep: int = 0):
        self.fingerprint, self.allow_change = fingerprint, allow_change
        self.save_folder, self.keep = save_folder, keep

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        old = state.get("fingerprint")
        if old and old != self.fingerprint:
            msg = (
                f"the checkpoint was trained on data with fingerprint {old[:12]}..., but this config's data "
                f"(sources, proportions, tokenizer, sequence length) has {self.fingerprint[:12]}..."
            )
            if not self.allow_change:
                raise ValueError(msg + "; set cpt.allow_fingerprint_change=true to resume anyway")
            log.warning("%s; resuming anyway (cpt.allow_fingerprint_change)", msg)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        # older checkpoints than the newest `keep` + 1 (the newest may still be uploading) are deleted
        if self.save_folder and self.keep > 0 and dist.get_global_rank() == 0:
            try:
                prune(self.save_folder, self.keep + 1)
            except storage.StorageError as exc:
                log.warning("could not prune %s: %s", self.save_folder, exc)
