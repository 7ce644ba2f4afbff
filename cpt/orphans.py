"""Helper processes of a killed launch, found and stopped before the relaunch starts.

Composer's checkpoint uploader (still used for sharded checkpoints) runs in spawned worker processes that a
SIGKILLed run leaves behind, still polling their queue and able to upload stale files into the save folder.
``mark`` puts ``CPT_RUN_OWNER=<run key>:<pid>`` into the environment, so every process the run spawns from
then on carries it (``/proc/<pid>/environ`` shows the environment a process was started with). ``reap``
stops those whose owner, on this host, is gone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal

log = logging.getLogger(__name__)
ENV = "CPT_RUN_OWNER"


def run_key(save_folder: str) -> str:
    return hashlib.sha256(save_folder.rstrip("/").encode()).hexdigest()[:16]


def mark(save_folder: str) -> None:
    os.environ[ENV] = f"{run_key(save_folder)}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _owner_of(pid: str) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read().split(b"\0")
    except OSError:  # gone, or not ours to read
        return None
    prefix = f"{ENV}=".encode()
    for item in env:
        if item.startswith(prefix):
            key, _, owner = item[len(prefix) :].decode().rpartition(":")
            return (key, int(owner)) if owner.isdigit() else None
    return None


def reap(save_folder: str) -> list[int]:
    """SIGKILL this host's processes spawned by a dead launch of the run; returns their pids."""
    if not os.path.isdir("/proc"):
        return []
    key, killed = run_key(save_folder), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        owner = _owner_of(pid)
        if owner and owner[0] == key and not pid_alive(owner[1]):
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except ProcessLookupError:
                pass
    if killed:
        log.warning("stopped %d process(es) left by a killed launch of %s: %s", len(killed), save_folder, killed)
    return killed
