"""One live launch per save folder: a lock file with a heartbeat, refreshed by a thread of rank 0."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from cpt.io import storage
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
    stall it, nor it training) and releases the lock when training ends. A failed refresh of any kind is
    logged and tried again at the next beat."""

    def __init__(self, save_folder: str, every_s: float = 30.0):
        self.save_folder, self.every_s = save_folder, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self._thread = threads.start("cpt-run-lock", self._beat)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                heartbeat(self.save_folder)
            except Exception as exc:  # noqa: BLE001 - whatever it is, the next beat tries again
                log.warning("could not refresh the run lock in %s: %r", self.save_folder, exc)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            release(self.save_folder)
