"""Every CPU run keeps freed memory: glibc's allocator settings, read once when a process starts.

glibc hands every large buffer (the 50k-vocabulary logits, ~100 MB a step at the quickstart's size) back to the
system when freed and faults it in again the next step. Keeping freed memory took a 100-step tiny run from 46.8 s
to 31.1 s on 2 cores (system time 31 s -> 3 s; ``python benchmarks/quickstart.py --ab-only``). The settings are
read only when a process starts, so a CPU launch from the command line (``cpt train``, ``python -m cpt.train``)
re-executes itself once with them; a GPU machine, or a process that already has them, runs as it is.

**Threads.** torch's default is one intra-op thread per core for each process. One rank keeps it: on 2 free cores,
100 tiny steps took 24.5 s at 2 threads against 34.6 s at 1 (``python benchmarks/quickstart.py --threads``). Ranks
that share a node's CPUs split them (``share_cores``), since two ranks at two threads each on two cores oversubscribe
them; an explicit ``OMP_NUM_THREADS`` wins.
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


def share_cores() -> int | None:
    """On a CPU node running several ranks (``LOCAL_WORLD_SIZE``), give each rank its share of the cores torch would
    use; returns the thread count set, or None when nothing changed (a GPU, one rank, or ``OMP_NUM_THREADS`` set)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if has_gpu() or ranks <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = max(1, torch.get_num_threads() // ranks)
    torch.set_num_threads(threads)
    log.info("%d ranks share this node's CPUs: %d torch thread(s) each", ranks, threads)
    return threads
