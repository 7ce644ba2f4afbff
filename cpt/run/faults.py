"""Deliberate SIGKILLs at chosen points, for the preemption tests and ``benchmarks/resume.py``.

``CPT_FAULT=<point>:<batch>`` makes the run kill itself with SIGKILL (nothing gets to clean up, as in a
preemption) at one point of batch ``<batch>``:

- ``step``: after the backward pass of the batch that starts at ``<batch>``, before the optimizer step;
- ``eval``: mid-way through the evaluation held at ``<batch>``;
- ``save``: while the checkpoint of ``<batch>`` is being written;
- ``upload``: once half of the checkpoint of ``<batch>`` has been sent to the save folder.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from composer.core import Callback, State
from composer.loggers import Logger

from cpt.run import checkpoints

log = logging.getLogger(__name__)
ENV = "CPT_FAULT"
POINTS = ("step", "eval", "save", "upload")


def planned() -> tuple[str, int] | None:
    """The fault asked for in ``CPT_FAULT``, or None."""
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    point, _, batch = spec.partition(":")
    if point not in POINTS or not batch.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<batch> with point one of {', '.join(POINTS)}")
    return point, int(batch)


def kill(point: str, batch: int) -> None:
    log.warning("fault injected: SIGKILL during %s at batch %d", point, batch)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def upload_progress(name: str, nbytes: int):
    """A boto progress callback that kills half-way through a file of the checkpoint ``name`` of the planned
    batch (the file itself, or a file of a sharded checkpoint's folder)."""
    plan = planned()
    if plan is None or plan[0] != "upload" or checkpoints.batch_of(name) != plan[1]:
        return None
    sent = 0

    def progress(increment: int) -> None:
        nonlocal sent
        sent += increment
        if sent >= nbytes // 2:
            kill("upload", plan[1])

    return progress


class Faults(Callback):
    """Added to the run's callbacks by the run plan (``Plan.to_foundry``) when ``CPT_FAULT`` is set."""

    KEY = "cpt_faults"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, save_folder: str | None = None):
        self.point, self.batch = planned() or ("", -1)
        self.save_folder = save_folder

    def after_backward(self, state: State, logger: Logger) -> None:
        if self.point == "step" and int(state.timestamp.batch) == self.batch:
            kill("step", self.batch)

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        if self.point == "eval" and int(state.timestamp.batch) == self.batch:
            kill("eval", self.batch)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        # runs just before Composer's saver: a watcher kills once the checkpoint file has started to grow
        if self.point == "save" and int(state.timestamp.batch) == self.batch and self.save_folder:
            folder = self.save_folder

            def started() -> bool:
                for name in os.listdir(folder) if os.path.isdir(folder) else []:
                    path = os.path.join(folder, name)
                    if checkpoints.batch_of(name) == self.batch and os.path.isfile(path) and os.path.getsize(path):
                        return True
                return False

            def watch() -> None:
                while True:
                    if started():
                        kill("save", self.batch)
                    time.sleep(0.0005)

            threading.Thread(target=watch, daemon=True).start()
