"""Checkpoints in a run's save folder: their names, listing, integrity, the resume choice and pruning.

This module is the one place that knows how a checkpoint is named. cpt sets Composer's ``save_filename``
(and refuses a YAML that sets it), so every checkpoint in a save folder is one of:

- monolithic: a file ``ep<E>-ba<B>-rank0.pt`` (a zip file: every member has a CRC);
- sharded (``fsdp_config.state_dict_type: sharded``): a folder ``ep<E>-ba<B>/`` in Composer's layout, one
  ``__<rank>_0.distcp`` per rank and ``.metadata``, and cpt's completion marker ``.cpt-complete.json``,
  written last, that lists every file with its size and sha256.

Only direct children of the save folder count: a checkpoint copied into a subfolder (``keep/``) is neither
resumed from nor pruned. The resume rule: the newest checkpoint that is intact (monolithic: every zip member
passes its CRC; sharded: the marker is there and every file matches it), falling back past broken ones with
a warning. The one chosen must also load with ``weights_only=True`` (``cpt.io.safe_load``), or the launch
stops naming it: a checkpoint that asks to run code is never handed to Composer. Composer's own autoresume
is not used: it follows a ``latest`` pointer uploaded about 30 s late, downloads into ``./s3:/...`` and never
deletes remote checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass

from cpt.io import safe_load, storage, untrusted
from cpt.io.cache import locked

log = logging.getLogger(__name__)

SAVE_FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"  # Composer's save_filename, set by cpt
SHARDED_PREFIX = "ep{epoch}-ba{batch}"  # Composer's fsdp_config.sharded_ckpt_prefix_dir (its default)
MARKER = ".cpt-complete.json"
METADATA = ".metadata"  # torch.distributed.checkpoint's, written by rank 0
_MONOLITHIC = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")
_SHARDED = re.compile(r"^ep(\d+)-ba(\d+)$")
_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


@dataclass(frozen=True)
class Checkpoint:
    batch: int
    name: str  # the file (monolithic) or folder (sharded) name inside the save folder
    sharded: bool


def batch_of(name: str) -> int | None:
    """The batch of a checkpoint's name (``ep0-ba8-rank0.pt`` or ``ep0-ba8`` -> 8), or None for other names."""
    m = _MONOLITHIC.match(os.path.basename(name.rstrip("/"))) or _SHARDED.match(os.path.basename(name.rstrip("/")))
    return int(m.group(2)) if m else None


def is_shard_of_rank(file_name: str, rank: int) -> bool:
    """Whether a file of a sharded checkpoint folder was written by ``rank`` (its shard; rank 0 also .metadata)."""
    m = _SHARD_FILE.match(file_name)
    return (m is not None and int(m.group(1)) == rank) or (rank == 0 and file_name == METADATA)


def listing(save_folder: str) -> list[Checkpoint]:
    """Every checkpoint directly in the save folder (no subfolders), newest first; intact or not."""
    files, folders = storage.list_children(save_folder)
    found = [Checkpoint(batch_of(n), n, False) for n in files if _MONOLITHIC.match(n)]
    found += [Checkpoint(batch_of(n), n, True) for n in folders if _SHARDED.match(n)]
    return sorted(found, key=lambda c: (c.batch, c.sharded), reverse=True)


def checkpoints(save_folder: str) -> list[tuple[int, str]]:
    """``(batch, name)`` of every checkpoint directly in the save folder, newest first."""
    return [(c.batch, c.name) for c in listing(save_folder)]


def intact(path: str) -> bool:
    """A local monolithic checkpoint whose every zip member passes its CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _describe(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


MAX_BROKEN = 16  # broken checkpoints looked at, newest first, before the search gives up (planted names)


def _marker(save_folder: str, name: str) -> dict | None:
    """The completion marker, read back as untrusted: every file a name with a non-negative size and a sha256."""
    url = storage.join(save_folder, name, MARKER)
    if not storage.exists(url):
        return None
    try:
        marker = untrusted.record(url, "the completion marker", limit=1 << 20)
        untrusted.field(marker, "files", dict, url)
        untrusted.field(marker, "world_size", int, url)
    except untrusted.UntrustedError:
        return None
    return marker


def _fetch_sharded(save_folder: str, name: str, cache: str) -> tuple[str | None, str]:
    """``(local folder, '')`` for a complete sharded checkpoint whose files match its marker, else ``(None, why)``."""
    marker = _marker(save_folder, name)
    if marker is None:
        return None, f"it has no completion marker ({MARKER}): it was not fully written or uploaded"
    files = marker.get("files", {})
    strays = sorted(n for n in files if n != METADATA and not _SHARD_FILE.match(str(n)))
    if strays:
        return None, f"its marker lists {strays[0]!r}, which is not a file of a sharded checkpoint"
    ranks = {int(m.group(1)) for n in files if (m := _SHARD_FILE.match(n))}
    if METADATA not in files or ranks != set(range(int(marker.get("world_size", -1)))):
        return None, f"its marker lists no {METADATA} or not one shard per rank"
    for file_name, want in files.items():
        ok = isinstance(want, dict) and all(isinstance(want.get(k), t) for k, t in (("bytes", int), ("sha256", str)))
        if not ok or isinstance(want["bytes"], bool) or want["bytes"] < 0:
            return None, f"its marker's entry for {file_name} is not {{bytes, sha256}}"
    present = set(storage.list_children(storage.join(save_folder, name))[0])
    missing = sorted(set(files) - present)
    if missing:
        return None, f"{missing[0]} is missing"
    local = os.path.join(cache, name) if storage.is_s3(save_folder) else storage.join(save_folder, name)
    for file_name, want in sorted(files.items()):
        path = os.path.join(local, file_name)
        url = storage.join(save_folder, name, file_name)
        if storage.size(url) != want["bytes"]:  # before anything is fetched
            return None, f"{file_name} does not match the size in its marker"
        if storage.is_s3(save_folder) and not (os.path.isfile(path) and _describe(path) == want):
            storage.download_file(url, path)
        try:
            untrusted.regular(path, file_name)  # a FIFO or a device would hang or never end
        except untrusted.UntrustedError as exc:
            return None, str(exc)
        if _describe(path) != want:
            return None, f"{file_name} does not match the size and sha256 in its marker"
    return local, ""


def _localise(folder: str, name: str, cache: str) -> tuple[str | None, str]:
    """``(local path, '')`` for the checkpoint ``name`` in ``folder`` once it passed its integrity check
    (downloaded into ``cache`` from ``s3://``), else ``(None, why)``."""
    if _SHARDED.match(name):
        return _fetch_sharded(folder, name, cache)
    url = storage.join(folder, name)
    local = url
    if storage.is_s3(folder):
        local = os.path.join(cache, name)
        if not (os.path.isfile(local) and intact(local)):
            if storage.size(url) < MIN_BYTES:  # a zip file holds at least its end record: refused unfetched
                return None, "not an intact checkpoint: too small to be one"
            storage.download_file(url, local)
    if not intact(local):
        return None, "not an intact checkpoint: a zip member fails its CRC, or it is missing"
    return local, ""


MIN_BYTES = 22  # a zip file's end-of-central-directory record


def _discard(cache: str, name: str, save_folder: str) -> None:
    """Remove the cache's copy of a broken checkpoint of an ``s3://`` folder (a local folder has no copy)."""
    if storage.is_s3(save_folder):
        clear_local(os.path.join(cache, name))


def fetch(url: str, cache: str) -> Checkpoint:
    """One named checkpoint (``.../ep0-ba8-rank0.pt`` or a sharded ``.../ep0-ba8``), local or ``s3://``: a local
    path to it after the same checks as for resume; ``ValueError`` naming what is wrong."""
    name = os.path.basename(url.rstrip("/"))
    parent = url.rstrip("/")[: -len(name)].rstrip("/") or "."
    batch = batch_of(name)
    if batch is None:
        raise ValueError(f"{url} is not a checkpoint's name (ep<E>-ba<B>-rank0.pt, or ep<E>-ba<B>/ when sharded)")
    with locked(cache):
        local, why = _localise(parent, name, cache)
        if local is None:
            raise ValueError(f"{url}: {why}")
        safe_load.check(local)
    return Checkpoint(batch, local, bool(_SHARDED.match(name)))


def find_resume(save_folder: str, cache: str, verb: str = "resuming from", own: bool = True) -> Checkpoint | None:
    """The newest intact checkpoint in ``save_folder`` with ``name`` set to a local path, or None when it holds none.

    In the run's own local folder (``own``) a corrupt monolithic file is renamed ``*.corrupt`` (Composer refuses
    to save over a newer file); another run's folder (``cpt.init``) is only ever read. After ``MAX_BROKEN``
    broken checkpoints the search stops with ``ValueError``: planted names cost a bounded number of downloads."""
    with locked(cache):  # ranks on one node download once
        broken = 0
        for ck in listing(save_folder):
            url = storage.join(save_folder, ck.name)
            if broken >= MAX_BROKEN:
                raise ValueError(
                    f"{save_folder}: the {MAX_BROKEN} newest checkpoints are all broken; refusing to look further "
                    f"(the next is {ck.name}). Move the broken ones away, or resume from one named checkpoint"
                )
            local, why = _localise(save_folder, ck.name, cache)
            if local is None:
                broken += 1
                _discard(cache, ck.name, save_folder)
                log.warning("skipping %s checkpoint %s: %s", "broken sharded" if ck.sharded else "corrupt", url, why)
                if own and not ck.sharded and not storage.is_s3(save_folder) and os.path.isfile(url):
                    os.replace(url, url + ".corrupt")
                continue
            safe_load.check(local)  # Composer unpickles without restriction: only a file that passes reaches it
            log.info("%s %s (batch %d)", verb, url, ck.batch)
            return Checkpoint(ck.batch, local, ck.sharded)
    return None


def prune(save_folder: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints directly in ``save_folder``; returns the names deleted.

    A sharded checkpoint goes as a whole folder, its marker first (so a half-deleted one is never resumed)."""
    if keep <= 0:
        return []
    doomed = listing(save_folder)[keep:]
    for ck in doomed:
        url = storage.join(save_folder, ck.name)
        if ck.sharded:
            storage.delete(storage.join(url, MARKER))
            storage.delete_folder(url)
        else:
            storage.delete(url)
    return [ck.name for ck in doomed]


def clear_local(path: str) -> None:
    """Remove a local file or folder (a staged checkpoint once uploaded)."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
