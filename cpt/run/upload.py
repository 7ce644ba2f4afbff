"""Checkpoints into the run's save folder: uploaded by a thread of ours, marked complete, trimmed to the newest N.

Composer saves into a local staging folder (for an ``s3://`` save folder, and always for sharded
checkpoints) and this callback copies each finished checkpoint to the save folder with ``cpt.io.storage``,
which rides out S3 outages up to ``cpt.s3_retry_s``. Composer's own uploader is not used: it starts worker
processes that outlive a SIGKILLed run, it gives up on an outage after boto's few retries, and it never
deletes remote checkpoints.

- Monolithic: rank 0 uploads ``ep*-ba*-rank0.pt``. An S3 object appears whole or not at all, so a checkpoint
  killed mid-upload is simply absent and the resume rule takes the one before.
- Sharded: every rank uploads its own files of ``ep*-ba*/`` (rank 0 also ``.metadata``) and then a note of
  them (``.cpt-rank<r>.json``: sizes and sha256). Rank 0 waits for every rank's note and writes the
  completion marker last (``cpt.run.checkpoints.MARKER``); a folder without it is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from cpt.io import storage, untrusted
from cpt.run import checkpoints, faults, threads

log = logging.getLogger(__name__)


def _rank_note(rank: int) -> str:
    return f".cpt-rank{rank}.json"


class Uploader:
    """The upload queue of one rank, independent of Composer so that it can be driven directly in tests."""

    def __init__(
        self,
        save_folder: str,
        staging: str | None,
        keep: int = 0,
        sharded: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if staging is None and (storage.is_s3(save_folder) or sharded):
            raise ValueError(f"{save_folder}: an s3:// save folder, or sharded checkpoints, need a staging folder")
        self.save_folder, self.staging, self.keep = save_folder, staging, keep
        self.sharded, self.rank, self.world_size = sharded, rank, world_size
        self._seen: set[str] = set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        self.saved_at = 0.0  # perf_counter when the save began (for the log)

    @property
    def active(self) -> bool:
        return self.sharded or self.rank == 0

    def start(self) -> None:
        if not self.active:
            return
        os.makedirs(self._local(), exist_ok=True)
        self._seen.update(os.listdir(self._local()))
        if self.staging:
            self._thread = threads.start("cpt-checkpoint-upload", self._work)

    def _local(self) -> str:
        return self.staging or self.save_folder

    def collect(self) -> None:
        """Picks up what the saver wrote since the last call: logs its save time, queues its upload, trims."""
        self.raise_if_failed()
        if not self.active:
            return
        new = sorted((n for n in os.listdir(self._local()) if self._mine(n)), key=checkpoints.batch_of)
        for name in new:
            self._seen.add(name)
            local = os.path.join(self._local(), name)
            nbytes = sum(os.path.getsize(p) for p in self._files(name)) if self.sharded else os.path.getsize(local)
            log.info("saved %s (%.1f MB) in %.2fs", name, nbytes / 1e6, time.perf_counter() - self.saved_at)
            if self._thread is not None:
                self._queue.put(name)
        if new and self._thread is None:
            self._trim()

    def _mine(self, name: str) -> bool:
        if name in self._seen or checkpoints.batch_of(name) is None:
            return False
        if not self.sharded:
            return name.endswith(".pt")
        folder = os.path.join(self._local(), name)
        return os.path.isdir(folder) and any(checkpoints.is_shard_of_rank(n, self.rank) for n in os.listdir(folder))

    def _files(self, name: str) -> list[str]:
        """This rank's local files of a sharded checkpoint."""
        folder = os.path.join(self._local(), name)
        return [
            os.path.join(folder, n) for n in sorted(os.listdir(folder)) if checkpoints.is_shard_of_rank(n, self.rank)
        ]

    def wait(self) -> None:
        """Until every queued checkpoint is uploaded (and, sharded, marked complete); then raises any failure."""
        if self._thread is not None:
            self._queue.join()
        self.raise_if_failed()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(
                f"checkpoint upload failed: {self._error}. The checkpoints uploaded before it in "
                f"{self.save_folder} are intact: relaunch the same command to resume from the newest"
            ) from self._error

    def _work(self) -> None:
        while (name := self._queue.get()) is not None:
            try:
                if self.sharded:
                    self._upload_sharded(name)
                else:
                    self._upload_file(name)
                self._trim()
            except Exception as exc:  # reported to the training loop at its next batch
                log.error("uploading %s to %s failed: %s", name, self.save_folder, exc)
                self._error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _upload_file(self, name: str) -> None:
        local, url = os.path.join(self.staging, name), storage.join(self.save_folder, name)
        nbytes, t0 = os.path.getsize(local), time.perf_counter()
        storage.upload_file(local, url, progress=faults.upload_progress(name, nbytes))
        log.info("uploaded %s (%.1f MB) in %.2fs", url, nbytes / 1e6, time.perf_counter() - t0)
        os.remove(local)

    def _upload_sharded(self, name: str) -> None:
        url, t0 = storage.join(self.save_folder, name), time.perf_counter()
        files = self._files(name)
        note = {}
        for path in files:
            nbytes = os.path.getsize(path)
            note[os.path.basename(path)] = {"bytes": nbytes, "sha256": checkpoints.sha256_file(path)}
            progress = faults.upload_progress(name, nbytes)
            storage.upload_file(path, storage.join(url, os.path.basename(path)), progress=progress)
        storage.write_bytes(storage.join(url, _rank_note(self.rank)), json.dumps({"files": note}).encode())
        log.info(
            "uploaded rank %d's part of %s (%d files) in %.2fs", self.rank, url, len(files), time.perf_counter() - t0
        )
        for path in files:
            os.remove(path)
        if self.rank == 0:
            self._mark_complete(name)

    def _mark_complete(self, name: str) -> None:
        """Rank 0: once every rank's note is in the save folder (waiting up to ``cpt.s3_retry_s``), write the
        completion marker from them."""
        url, deadline = storage.join(self.save_folder, name), time.monotonic() + storage.retry_limit_s()
        notes = {_rank_note(r) for r in range(self.world_size)}
        while not notes <= set(storage.list_children(url)[0]):
            if time.monotonic() > deadline:
                raise storage.StorageError(f"{url}: not every rank uploaded its shard (waiting for {sorted(notes)})")
            time.sleep(0.2)
        files = {}
        for note in sorted(notes):
            where = storage.join(url, note)  # another rank's record, read back as untrusted
            files.update(untrusted.field(untrusted.record(where, "a rank's upload note"), "files", dict, where))
        marker = {"world_size": self.world_size, "files": files}
        storage.write_bytes(storage.join(url, checkpoints.MARKER), json.dumps(marker, indent=1).encode())
        log.info("uploaded %s (%d files, complete)", url, len(files))
        checkpoints.clear_local(os.path.join(self.staging, name))

    def _trim(self) -> None:
        if self.keep > 0 and self.rank == 0:
            try:
                checkpoints.prune(self.save_folder, self.keep)
            except Exception as exc:  # noqa: BLE001 - a failed delete never stops the run; the next trim retries
                log.warning("could not trim %s: %r", self.save_folder, exc)


class CheckpointUpload(Callback):
    """Composer's side of ``Uploader``: collects at each batch start, waits for the last upload at fit end.

    With no staging folder (a local save folder, monolithic checkpoints) it only trims. A failed upload stops
    training at the next batch with an error that names the checkpoint; those already uploaded stay.
    """

    KEY = "cpt_checkpoint_upload"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, save_folder: str, staging: str | None = None, keep: int = 0, sharded: bool = False):
        self.args = (save_folder, staging, keep, sharded)
        self.uploader: Uploader | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.uploader = Uploader(*self.args, rank=dist.get_global_rank(), world_size=dist.get_world_size())
        self.uploader.start()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.uploader is not None:
            self.uploader.saved_at = time.perf_counter()  # this callback runs just before Composer's saver

    def batch_start(self, state: State, logger: Logger) -> None:
        self.uploader.collect()

    def fit_end(self, state: State, logger: Logger) -> None:
        self.uploader.collect()
        self.uploader.wait()  # the final checkpoint is in the save folder before the run reports success

    def close(self, state: State, logger: Logger) -> None:
        if self.uploader is not None:
            self.uploader.stop()
