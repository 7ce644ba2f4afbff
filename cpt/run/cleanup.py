"""What a killed launch leaves behind, removed before the relaunch starts: spawned processes, shared memory.

**Processes.** A SIGKILLed run leaves its spawned processes behind for a while: the data loaders' persistent
workers notice their parent is gone only at their next status check, and until then they keep streaming's
shared memory mapped, so the relaunch could not clear it. ``mark`` puts ``CPT_RUN_OWNER=<run key>:<pid>``
into the environment, so every process the run spawns from then on carries it (``/proc/<pid>/environ`` shows
the environment a process was started with). ``reap`` stops those whose owner, on this host, is gone.

**Shared memory.** mosaicml-streaming's segments (``/dev/shm/<6 digits>_<name>``) of a killed run block a
relaunch (streaming refuses a local folder that a live-looking prefix registered). Streaming's own
``clean_stale_shared_memory`` unlinks every segment from prefix 0 up to the first free one: those of other
runs alive on the same host too (a second run on the machine crashed, or broke the first), and nothing past
a gap. Here a segment is stale when no process on this host maps it and it is more than a second old (one
being created is not mapped yet).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import signal
import time

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


SHM = "/dev/shm"


@functools.cache
def _pattern() -> re.Pattern:
    from streaming.base.constant import SHM_TO_CLEAN

    return re.compile(r"\d{6}_(" + "|".join(map(re.escape, SHM_TO_CLEAN)) + ")")


def is_streaming_segment(path: str) -> bool:
    """Whether ``path`` (``/000123_locals`` or ``/dev/shm/000123_locals``) names one of streaming's segments."""
    return bool(_pattern().fullmatch(os.path.basename(path)))


def mapped() -> set[str]:
    """Names of the ``/dev/shm`` files that a process on this host maps (as far as ``/proc`` lets us see)."""
    names = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    if f"{SHM}/" in line:
                        names.add(line.split(f"{SHM}/", 1)[1].split()[0])
        except OSError:  # gone, or another user's
            continue
    return names


def clean_stale(min_age_s: float = 1.0) -> list[str]:
    """Unlink streaming's segments that no process maps; returns their names."""
    try:
        names = [n for n in os.listdir(SHM) if is_streaming_segment(n)]
    except FileNotFoundError:
        return []
    if not names:
        return []
    live, now, removed = mapped(), time.time(), []
    for name in sorted(set(names) - live):
        path = os.path.join(SHM, name)
        try:
            if now - os.stat(path).st_mtime < min_age_s:
                continue
            os.unlink(path)
        except (FileNotFoundError, PermissionError):
            continue
        removed.append(name)
    if removed:
        log.info("removed %d stale shared memory segments of killed runs: %s", len(removed), ", ".join(removed[:6]))
    return removed


LOCK_FILE = re.compile(r"(\d{6})_barrier_filelock")  # streaming's, in the temp folder: one per prefix ever used


def clean_lock_files(min_age_s: float = 60.0) -> list[str]:
    """Remove streaming's ``<prefix>_barrier_filelock`` files (in the temp folder) of prefixes that no longer have
    a segment in ``/dev/shm``: every run leaves one behind, ended or killed. Paths removed are returned."""
    import tempfile

    tmp = tempfile.gettempdir()
    try:
        live = {n.split("_", 1)[0] for n in os.listdir(SHM) if is_streaming_segment(n)}
        names = os.listdir(tmp)
    except FileNotFoundError:
        return []
    now, removed = time.time(), []
    for name in names:
        m = LOCK_FILE.fullmatch(name)
        path = os.path.join(tmp, name)
        if not m or m.group(1) in live:
            continue
        try:
            if os.path.islink(path) or now - os.lstat(path).st_mtime < min_age_s:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed
