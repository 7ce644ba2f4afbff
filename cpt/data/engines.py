"""Who runs a conversion's file tasks (``cpt.data.file_task``): this machine's processes, or a Ray cluster.

Both engines run the same task function on the same tasks, so their output is the same bytes. Each yields
``(task, result)`` as tasks finish and draws one progress bar on the driver: documents, tokens/s and tasks
done/total.

- ``local`` (the default): one process (``--workers 1``) or a pool of spawned processes; documents and tokens
  are counted as they are tokenized.
- ``ray``: Ray Core tasks, one per input file, on the cluster at ``--ray-address`` (``auto``,
  ``ray://host:port``), or on a Ray started here when it is empty. A worker that dies mid-task is retried by Ray
  (``RETRIES``); an error in the input is not retried and reaches the driver as the task raised it (its
  file and line). Counts arrive as each task finishes.
"""

from __future__ import annotations

import os
import queue as _queue
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context

from cpt.data import file_task
from cpt.data.file_task import FileResult, FileTask

ENGINES = ("local", "ray")
RETRIES = 3  # Ray's retries of a task whose worker died (a lost node, an OOM kill)
# what a Ray worker on another node needs from the driver's environment to reach the same bucket (credentials are
# the nodes' own: an instance role, or their environment)
FORWARDED = ("S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "CPT_CACHE", file_task.FAULT)


class Progress:
    """The driver's one progress bar (tqdm), or nothing."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.docs = self.tokens = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc="convert", unit=" doc", dynamic_ncols=True)
        self.total, self.done = total, done

    def add(self, docs: int, tokens: int) -> None:
        self.docs, self.tokens = self.docs + docs, self.tokens + tokens
        if self.bar is not None:
            self.bar.update(docs)
            self._postfix()

    def task_done(self) -> None:
        self.done += 1
        if self.bar is not None:
            self._postfix()

    def _postfix(self) -> None:
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s, files {self.done}/{self.total}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _counts(result: FileResult) -> tuple[int, int]:
    stats = result.domains.values()
    return sum(s["docs_written"] for s in stats), sum(s["tokens"] for s in stats)


# ---- local ---------------------------------------------------------------------------------------------------


class _InlinePool:
    """``submit`` runs the call at once, in this process."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:  # delivered through fut.result(), as a process pool would
            fut.set_exception(exc)
        return fut

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


def run_local(tasks: list[FileTask], workers: int, progress: Progress) -> Iterator[tuple[FileTask, FileResult]]:
    if not tasks:
        return
    if workers == 1:  # in this process: no spawn, no second import of mosaicml-streaming
        queue, pool = _queue.Queue(), _InlinePool()
        file_task.set_progress(queue)
    else:
        ctx = get_context("spawn")
        queue = ctx.Queue()
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=file_task.set_progress, initargs=(queue,))
    try:
        futures = {pool.submit(file_task.run, t): t for t in tasks}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2)
            while not queue.empty():
                progress.add(*queue.get())
            for fut in sorted(done, key=lambda f: futures[f].index):
                progress.task_done()
                yield futures[fut], fut.result()  # the first error stops the run (InputError: file and line)
    finally:
        pool.shutdown(cancel_futures=True)
        file_task.set_progress(None)


# ---- ray -----------------------------------------------------------------------------------------------------


def run_ray(tasks: list[FileTask], address: str, progress: Progress) -> Iterator[tuple[FileTask, FileResult]]:
    if not tasks:
        return
    try:
        import ray
    except ImportError as exc:
        raise ValueError("--engine ray needs Ray: pip install -c constraints.txt -e '.[ray]'") from exc
    env = {k: os.environ[k] for k in FORWARDED if k in os.environ}
    started = not ray.is_initialized()  # a Ray this call starts or joins is left when it ends
    if started:
        ray.init(address=address or None, runtime_env={"env_vars": env}, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=RETRIES)(file_task.run)
    text = tasks[0].tokenizer
    shared = ray.put(text)  # one copy of the tokenizer in the object store, not one per task
    refs = {remote.remote(_without_tokenizer(t), shared): t for t in tasks}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if exc.cause is not None:
                        raise exc.cause from None  # the task's own error (an InputError names file and line)
                    raise RuntimeError(f"converting {refs[ref].path} failed on Ray: {exc}") from None
                except ray.exceptions.RayError as exc:  # its worker died more often than RETRIES
                    raise RuntimeError(f"converting {refs[ref].path} failed on Ray: {exc}") from None
                progress.add(*_counts(result))
                progress.task_done()
                yield refs[ref], result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _without_tokenizer(task: FileTask) -> FileTask:
    return replace(task, tokenizer="")
