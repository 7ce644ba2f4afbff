"""The project's local cache: ``$CPT_CACHE``, else ``~/.cache/cpt``; a file lock; local copies of remote folders
and files.

A copy of an ``s3://`` folder is kept with the listing it was made from (every object's ETag), a copy of one
object with its ETag. Each use lists
the folder again: the same listing reuses the copy, a changed one (a folder re-uploaded to the same path)
fetches it again. The log says which copy is used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from cpt.io import storage, untrusted

log = logging.getLogger(__name__)


def cache_dir(*parts: str) -> str:
    root = os.environ.get("CPT_CACHE") or os.path.join(Path.home(), ".cache", "cpt")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


@contextmanager
def locked(folder: str):
    """An exclusive file lock on ``folder`` (ranks on one node that share a cache take turns). The lock file is
    opened without following a symlink and without truncating: a planted ``.lock`` link fails, harming nothing."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise storage.StorageError(f"cannot lock {folder}: {path} is a symlink or not a file ({exc.strerror})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def mirror(url: str, kind: str, check: Callable[[list[str]], None] | None = None) -> str:
    """A local folder holding the files under ``url`` as they are now; local paths are returned as they are.

    ``check`` sees the listing's keys before anything is downloaded and may raise. Safe when several ranks
    start at once: one downloads under a file lock, the others wait and reuse its copy.
    """
    if not storage.is_s3(url):
        return url
    url = url.rstrip("/")
    home = cache_dir(kind, hashlib.sha256(url.encode()).hexdigest()[:16])
    files, record = os.path.join(home, "files"), os.path.join(home, "listing.json")
    with locked(home):
        now = storage.listing(url)
        targets = {key: untrusted.child(os.path.join(home, "files.tmp"), key, url) for key in now}
        if check is not None:
            check(sorted(now))
        if os.path.isdir(files) and _recorded(record) == {"url": url, "objects": now}:
            log.info("using the cached copy of %s at %s (%d objects, ETags unchanged)", url, files, len(now))
            return files
        if os.path.lexists(record):
            log.info("%s changed since it was cached at %s: fetching it again", url, files)
        tmp = os.path.join(home, "files.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for key in sorted(now):
            storage.download_file(storage.join(url, key), targets[key])
        if os.path.lexists(record):
            os.remove(record)  # no record while files are swapped: an interrupted swap is fetched again
        shutil.rmtree(files, ignore_errors=True)
        os.replace(tmp, files)
        write_private(record, json.dumps({"url": url, "objects": now}).encode())
        log.info("downloaded %s (%d objects) into %s", url, len(now), files)
    return files


def mirror_file(url: str, kind: str) -> str:
    """A local copy of one ``s3://`` object as it is now (a local path is returned as it is): fetched once per node
    while its ETag stays the same, under the same lock as ``mirror``.

    The copy is ``<home>/files/<name>`` and its record ``<home>/record.json``, so no downloaded name can be the
    record; both are written to a private temporary file and renamed, so a planted symlink is replaced, never
    followed."""
    if not storage.is_s3(url):
        return url
    name = url.rstrip("/").rsplit("/", 1)[-1]
    untrusted.key(name, url)  # .../.. and .../. are not objects
    if url.endswith("/"):
        raise untrusted.UntrustedError(f"{url}: names a folder, not a file")
    home = cache_dir(kind, hashlib.sha256(url.encode()).hexdigest()[:16])
    local, record = os.path.join(home, "files", name), os.path.join(home, "record.json")
    with locked(home):
        now = {"url": url, "etag": storage.etag(url)}
        if os.path.isfile(local) and _recorded(record) == now:
            log.info("using the cached copy of %s at %s (ETag unchanged)", url, local)
            return local
        if os.path.lexists(record):
            log.info("%s changed since it was cached at %s: fetching it again", url, local)
            os.remove(record)
        files = os.path.join(home, "files")
        if os.path.islink(files) or (os.path.exists(files) and not os.path.isdir(files)):
            os.remove(files)
        os.makedirs(files, exist_ok=True)
        storage.download_file(url, local)
        write_private(record, json.dumps(now).encode())
        log.info("downloaded %s into %s", url, local)
    return local


def _recorded(record: str) -> dict | None:
    """A cache record read back (a planted link, a bad one or none: None, and the copy is fetched again)."""
    if not os.path.isfile(record) or os.path.islink(record):
        return None
    try:
        return untrusted.record(record, "the cache record")
    except (untrusted.UntrustedError, storage.StorageError):
        return None


def write_private(path: str, data: bytes) -> None:
    """``data`` into ``path`` through a new private file beside it (``O_EXCL``, never through a link) and a rename,
    which replaces whatever ``path`` was (a planted symlink included) instead of writing through it."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
