"""Checkpoints into the run's save folder: uploaded by a thread of ours, and trimmed to the newest N.

With an ``s3://`` save folder, Composer saves into a local staging folder and this callback uploads each
finished checkpoint, retrying through S3 outages up to ``cpt.s3_retry_s`` (``cpt.storage``). Composer's own
uploader is not used: it starts worker processes that outlive a SIGKILLed run, it gives up on an outage
after boto's few retries, and it never deletes remote checkpoints. An S3 object appears whole or not at
all, so a checkpoint killed mid-upload is simply absent and the resume rule takes the one before.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from cpt import faults, storage
from cpt.resume import batch_of, prune

log = logging.getLogger(__name__)


class CheckpointUpload(Callback):
    """Rank 0: uploads what Composer saved in ``staging`` to ``save_folder``; keeps the newest ``keep`` there.

    With ``staging`` unset (a local save folder), it only trims. A failed upload stops training at the next
    batch with an error that names the checkpoint; the checkpoints already uploaded stay as they are.
    """

    def __init__(self, save_folder: str, staging: str | None = None, keep: int = 0):
        if not (staging or not storage.is_s3(save_folder)):
            raise ValueError(f"{save_folder}: an s3:// save folder needs a local staging folder")
        self.save_folder, self.staging, self.keep = save_folder, staging, keep
        self._seen: set[str] = set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        self._checkpoint_event = 0.0

    def _active(self) -> bool:
        return dist.get_global_rank() == 0

    def fit_start(self, state: State, logger: Logger) -> None:
        if not self._active():
            return
        os.makedirs(self._local(), exist_ok=True)
        self._seen.update(os.listdir(self._local()))
        if self.staging:
            self._thread = threading.Thread(target=self._work, name="cpt-checkpoint-upload", daemon=True)
            self._thread.start()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._checkpoint_event = time.perf_counter()  # this callback runs just before Composer's saver

    def batch_start(self, state: State, logger: Logger) -> None:
        self._collect()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._collect()
        if self._thread is not None:
            self._queue.join()  # the final checkpoint is on S3 before the run reports success
        self._raise_if_failed()

    def close(self, state: State, logger: Logger) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def _local(self) -> str:
        return self.staging or self.save_folder

    def _collect(self) -> None:
        """Picks up what the saver wrote since the last batch: logs its save time, queues its upload, trims."""
        self._raise_if_failed()
        if not self._active():
            return
        new = [n for n in os.listdir(self._local()) if batch_of(n) is not None and n not in self._seen]
        for name in sorted(new, key=batch_of):
            self._seen.add(name)
            nbytes = os.path.getsize(os.path.join(self._local(), name))
            seconds = time.perf_counter() - self._checkpoint_event
            log.info("saved %s (%.1f MB) in %.2fs", name, nbytes / 1e6, seconds)
            if self._thread is not None:
                self._queue.put(name)
        if new and self._thread is None:
            self._trim()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(
                f"checkpoint upload failed: {self._error}. The checkpoints uploaded before it in "
                f"{self.save_folder} are intact: relaunch the same command to resume from the newest"
            ) from self._error

    def _work(self) -> None:
        while (name := self._queue.get()) is not None:
            try:
                self._upload(name)
            except Exception as exc:  # reported to the training loop at its next batch
                self._error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _upload(self, name: str) -> None:
        local, url = os.path.join(self.staging, name), storage.join(self.save_folder, name)
        nbytes, t0 = os.path.getsize(local), time.perf_counter()
        storage.upload_file(local, url, progress=faults.upload_progress(name, nbytes))
        seconds = time.perf_counter() - t0
        log.info("uploaded %s (%.1f MB) in %.2fs", url, nbytes / 1e6, seconds)
        os.remove(local)
        self._trim()

    def _trim(self) -> None:
        if self.keep > 0:
            try:
                prune(self.save_folder, self.keep)
            except storage.StorageError as exc:
                log.warning("could not trim %s: %s", self.save_folder, exc)
