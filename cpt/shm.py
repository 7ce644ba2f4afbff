"""mosaicml-streaming's shared memory left behind by killed runs (``/dev/shm/<6 digits>_<name>``), removed.

A stale segment blocks a relaunch (streaming refuses a local folder that a live-looking prefix registered).
Streaming's own ``clean_stale_shared_memory`` unlinks every segment from prefix 0 up to the first free one:
those of other runs alive on the same host too (a second run on the machine crashed, or broke the first),
and nothing past a gap. Here a segment is stale when no process on this host maps it and it is more than a
second old (one being created is not mapped yet).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time

log = logging.getLogger(__name__)
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
