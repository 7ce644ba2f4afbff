"""One live launch per save folder: a lock file with a heartbeat, refreshed by a thread of rank 0."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from cpt.io import storage, untrusted
from cpt.run import threads
from cpt.run.cleanup import pid_alive

log = logging.getLogger(__name__)
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
    except (ValueError, KeyError, TypeError, OverflowError):
        return False


_held: dict[str, str] = {}  # save folder -> the version of the lock this process wrote last


def acquire(save_folder: str) -> None:
    """Take the run's lock in ``save_folder``, or raise ``RunLockError`` when a live launch holds it.

    Atomic: the lock is created only if absent (S3 ``If-None-Match: *``; locally a hard link), and a dead run's
    lock is taken over only if nobody rewrote it since it was read (S3 ``If-Match``; locally under ``flock``).
    Of launches that start together, exactly one gets it. A lock is live while its heartbeat is fresh and, on
    this host, its process exists; a SIGKILLed run on this host is taken over at once, one on another host
    after ``STALE_AFTER_S``.
    """
    path = storage.join(save_folder, LOCK)
    for _ in range(5):  # a lock released between two of these calls: look again
        version = storage.create_new(path, _payload())
        if version is not None:
            _held[save_folder] = version
            return
        found = storage.read_versioned(path)
        if found is None:
            continue
        data, old = found
        held = _read(data)
        age = time.time() - held["heartbeat"]
        mine = held.get("host") == socket.gethostname() and held.get("pid") == os.getpid()  # a relaunch in-process
        if age < STALE_AFTER_S and _alive_here(held) and not mine:
            raise RunLockError(
                f"{save_folder} is in use by a live run (host {held.get('host')}, pid "
                f"{held.get('pid')}, heartbeat {age:.0f}s ago); refusing a second launch. If that "
                f"run is dead, wait {STALE_AFTER_S:.0f}s or delete {path}"
            )
        version = storage.replace_if(path, _payload(), old)
        if version is None:
            raise RunLockError(f"{save_folder}: another launch took over the stale lock at the same moment ({path})")
        log.info("took over the lock of a dead launch in %s (host %s, pid %s)", path, held.get("host"), held.get("pid"))
        _held[save_folder] = version
        return
    raise RunLockError(f"{save_folder}: the lock {path} kept changing while being taken; relaunch")


def _read(data: bytes) -> dict:
    """A lock's record, read back as untrusted: anything malformed is a lock with no heartbeat (stale)."""
    try:
        held = untrusted.parse(data[:4096], LOCK, dict)
        beat = held.get("heartbeat")
        held["heartbeat"] = float(beat) if isinstance(beat, int | float) and not isinstance(beat, bool) else 0.0
    except (untrusted.UntrustedError, OverflowError):
        held = {"heartbeat": 0.0}
    if not math.isfinite(held["heartbeat"]):  # NaN or 1e999: no heartbeat
        held["heartbeat"] = 0.0
    return held


def _payload() -> bytes:
    return json.dumps({**_owner(), "heartbeat": time.time()}).encode()


def heartbeat(save_folder: str) -> None:
    """Refresh this process's lock; ``RunLockError`` when another launch has taken it since."""
    version = storage.replace_if(storage.join(save_folder, LOCK), _payload(), _held.get(save_folder, ""))
    if version is None:
        raise RunLockError(f"the run lock in {save_folder} was taken by another launch: this one must stop")
    _held[save_folder] = version


def release(save_folder: str) -> None:
    if _held.pop(save_folder, None) is not None:
        storage.delete(storage.join(save_folder, LOCK))


class RunLock(Callback):
    """Rank 0 keeps the run's lock fresh from a thread (so a long step, evaluation or S3 outage does not
    stall it, nor it training) and releases the lock when training ends. A failed refresh of any kind is
    logged and tried again at the next beat; a lock taken by another launch stops this one at its next batch."""

    KEY = "cpt_run_lock"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, save_folder: str, every_s: float = 30.0):
        self.save_folder, self.every_s = save_folder, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: RunLockError | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self._thread = threads.start("cpt-run-lock", self._beat)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                heartbeat(self.save_folder)
            except RunLockError as exc:
                log.error("%s", exc)
                self._lost = exc
                return
            except Exception as exc:  # noqa: BLE001 - whatever it is, the next beat tries again
                log.warning("could not refresh the run lock in %s: %r", self.save_folder, exc)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._lost is not None:
            raise self._lost

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._lost is None:
                release(self.save_folder)
