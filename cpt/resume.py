"""The resume rule: resume from our own save folder if it holds a good checkpoint, else load base weights only.

Composer's own autoresume follows a ``latest`` pointer that is uploaded about 30 s after the checkpoint,
downloads into ``./s3:/...`` and never deletes remote checkpoints. Instead, cpt lists the save folder
(local or ``s3://``), takes the newest ``ep*-ba*-rank0.pt``, downloads it into the run's cache folder,
checks every member's CRC (a ``.pt`` is a zip file) and falls back to the previous one, with a warning, when
it is corrupt. Checkpoints reach an ``s3://`` folder through ``cpt.upload``. The data fingerprint travels in
the checkpoint (``FingerprintGuard``) and is checked on load; ``RunLock`` refuses a second live launch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import zipfile

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from cpt import storage
from cpt.cache import locked
from cpt.orphans import pid_alive

log = logging.getLogger(__name__)
CHECKPOINT = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")


def batch_of(name: str) -> int | None:
    """The batch of a monolithic checkpoint's file name (``ep0-ba8-rank0.pt`` -> 8), or None for other names."""
    m = CHECKPOINT.match(os.path.basename(name))
    return int(m.group(2)) if m else None


def checkpoints(save_folder: str) -> list[tuple[int, str]]:
    """``(batch, name)`` of every monolithic checkpoint in the folder, newest first."""
    found = [(batch_of(key), key) for key in storage.list_prefix(save_folder)]
    return sorted(((b, key) for b, key in found if b is not None), reverse=True)


def intact(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def find_resume(save_folder: str, cache: str) -> str | None:
    """A local path to the newest intact checkpoint in ``save_folder``, or None when it holds none."""
    with locked(cache):  # ranks on one node download once
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
            if not storage.is_s3(save_folder):  # out of the way of Composer, which refuses newer files
                os.replace(local, local + ".corrupt")
    return None


def prune(save_folder: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints in ``save_folder``; returns what was deleted."""
    if keep <= 0:
        return []
    doomed = [name for _, name in checkpoints(save_folder)[keep:]]
    for name in doomed:
        storage.delete(storage.join(save_folder, name))
    return doomed


class FingerprintGuard(Callback):
    """Stores the data fingerprint in every checkpoint; refuses to resume onto different data."""

    def __init__(self, fingerprint: str, allow_change: bool = False):
        self.fingerprint, self.allow_change = fingerprint, allow_change

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


LOCK = ".cpt-lock.json"
STALE_AFTER_S = 120.0  # a lock whose heartbeat is older than this belongs to a dead run


class RunLockError(RuntimeError):
    """Another launch of the same run is alive."""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive_here(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell from here: trust the heartbeat
    try:
        return pid_alive(int(owner["pid"]))
    except (ValueError, KeyError):
        return False


def acquire(save_folder: str) -> None:
    """Take the run's lock in ``save_folder``, or raise ``RunLockError`` when a live launch holds it.

    A lock is live while its heartbeat is fresh and, on this host, its process exists; a SIGKILLed run on
    this host is taken over at once, one on another host after ``STALE_AFTER_S``.
    """
    path = storage.join(save_folder, LOCK)
    if storage.exists(path):
        held = json.loads(storage.read_bytes(path))
        age = time.time() - float(held.get("heartbeat", 0))
        if age < STALE_AFTER_S and _alive_here(held) and held.get("pid") != os.getpid():
            raise RunLockError(
                f"{save_folder} is in use by a live run (host {held.get('host')}, pid "
                f"{held.get('pid')}, heartbeat {age:.0f}s ago); refusing a second launch. If that "
                f"run is dead, wait {STALE_AFTER_S:.0f}s or delete {path}"
            )
    heartbeat(save_folder)


def heartbeat(save_folder: str) -> None:
    storage.write_bytes(storage.join(save_folder, LOCK), json.dumps({**_owner(), "heartbeat": time.time()}).encode())


def release(save_folder: str) -> None:
    storage.delete(storage.join(save_folder, LOCK))


class RunLock(Callback):
    """Rank 0 keeps the run's lock fresh from a thread (so a long step, evaluation or S3 outage does not
    stall it, nor it training) and releases the lock when training ends."""

    def __init__(self, save_folder: str, every_s: float = 30.0):
        self.save_folder, self.every_s = save_folder, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self._thread = threading.Thread(target=self._beat, name="cpt-run-lock", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                heartbeat(self.save_folder)
            except storage.StorageError as exc:
                log.warning("could not refresh the run lock: %s", exc)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            release(self.save_folder)
