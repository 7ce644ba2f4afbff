"""Every CPU run keeps freed memory: glibc's allocator settings, read once when a process starts.

glibc hands every large buffer (the 50k-vocabulary logits, ~100 MB a step at the quickstart's size) back to the
system when freed and faults it in again the next step. Keeping freed memory took a 100-step tiny run from 46.8 s
to 31.1 s on 2 cores (system time 31 s -> 3 s; ``python benchmarks/quickstart.py --ab-only``). The settings are
read only when a process starts, so a CPU launch from the command line (``cpt train``, ``python -m cpt.train``)
re-executes itself once with them; a GPU machine, or a process that already has them, runs as it is.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
}
_DONE = "CPT_CPU_SETTINGS"  # set in the re-executed process: never twice


def has_gpu() -> bool:
    """An NVIDIA driver on this machine (checked without importing torch, which takes seconds)."""
    return os.path.exists("/proc/driver/nvidia/version")


def apply_on_cpu() -> None:
    """Re-execute this command line with ``KEEP_FREED_MEMORY`` unless it runs on a GPU machine or already has it.
    Only for a process started from the command line (``sys.orig_argv``): never inside another program."""
    if has_gpu() or os.environ.get(_DONE) or all(k in os.environ for k in KEEP_FREED_MEMORY):
        return
    env = {**KEEP_FREED_MEMORY, **os.environ, _DONE: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
