"""The quickstart's speed on this machine: one tiny training run with glibc's default allocator and with freed
memory kept (``KEEP_FREED_MEMORY``), then, unless ``--ab-only``, the whole ``cpt quickstart``.

    python benchmarks/quickstart.py [--steps 100] [--ab-only]

Prints wall and system seconds per variant (``resource.getrusage`` of the child) and the quickstart's total.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

from cpt.pythia import save_tiny_pythia
from cpt.run.cpu import KEEP_FREED_MEMORY
from cpt.tools.quickstart import MAX_LR, SEQ, base_config, make_corpora, quickstart, write_config


def timed(cmd: list[str], env: dict, cwd: str) -> tuple[float, float]:
    """Wall and system seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime - before


def allocator_ab(steps: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        make_corpora(work, work)
        arch = save_tiny_pythia(os.path.join(work, "arch"), seq_len=SEQ)
        sched = {"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1}
        plain = {k: v for k, v in os.environ.items() if k not in KEEP_FREED_MEMORY}
        for label, env in (("default allocator", plain), ("freed memory kept", {**plain, **KEEP_FREED_MEMORY})):
            name = label.split()[0]
            cfg = base_config(work, work, name, arch, ["upstream"], MAX_LR, sched, steps, True, eval_every=steps)
            cfg["cpt"]["eval"].update(early=None, at_peak=False)
            path = write_config(cfg, work)
            wall, sys_s = timed([sys.executable, "-m", "cpt.train", path], env, work)
            print(
                f"{label:<20} {steps} steps: {wall:6.1f} s wall, {sys_s:5.1f} s system (one process, imports included)"
            )


def threads_ab(steps: int) -> None:
    """The same run with freed memory kept, at 1 thread and at torch's default (one per core)."""
    with tempfile.TemporaryDirectory() as work:
        make_corpora(work, work)
        arch = save_tiny_pythia(os.path.join(work, "arch"), seq_len=SEQ)
        sched = {"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1}
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CPT_THREADS")}
        base.update(KEEP_FREED_MEMORY)
        for label, extra in (("torch default threads", {}), ("1 thread", {"OMP_NUM_THREADS": "1"})):
            name = label.split()[0]
            cfg = base_config(work, work, name, arch, ["upstream"], MAX_LR, sched, steps, True, eval_every=steps)
            cfg["cpt"]["eval"].update(early=None, at_peak=False)
            path = write_config(cfg, work)
            wall, sys_s = timed([sys.executable, "-m", "cpt.train", path], {**base, **extra}, work)
            print(f"{label:<22} {steps} steps: {wall:6.1f} s wall, {sys_s:5.1f} s system ({os.cpu_count()} CPUs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="steps of the A/B run (default: 100)")
    ap.add_argument("--ab-only", action="store_true", help="only the allocator A/B, not the whole quickstart")
    ap.add_argument("--threads", action="store_true", help="only the thread-count A/B")
    args = ap.parse_args()
    if args.threads:
        return threads_ab(args.steps)
    allocator_ab(args.steps)
    if not args.ab_only:
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            quickstart(os.path.join(work, "qs"))
            print(f"cpt quickstart: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
