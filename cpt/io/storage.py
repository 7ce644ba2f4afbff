"""Local paths and ``s3://`` URLs behind one small interface.

The S3 client honours ``S3_ENDPOINT_URL`` (the same variable mosaicml-streaming reads), so tests and
on-prem object stores work without code changes. Each thread gets its own client, from its own boto3
``Session``, created once (boto3's sessions are not thread-safe; the upload, heartbeat and metrics threads
call S3 while training does). Every call rides out transient errors for up to ``retry_limit_s()``, which a
run sets from ``cpt.s3_retry_s`` with ``set_retry_limit``.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from cpt.io import redact

S3 = "s3://"
T = TypeVar("T")
log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A path or bucket cannot be read or written; the message names it."""


DEFAULT_RETRY_S = 600.0
_TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "Throttling", "RequestTimeout", "InternalError"}
_retry_s = DEFAULT_RETRY_S
_local = threading.local()  # this thread's {endpoint: client}


def set_retry_limit(seconds: float) -> None:
    """How long every S3 call of this process rides out an outage before giving up (``cpt.s3_retry_s``)."""
    global _retry_s
    _retry_s = float(seconds)


def retry_limit_s() -> float:
    return _retry_s


def _transient(exc: BaseException) -> bool:
    """A connection failure, a timeout or a 5xx/throttle answer: worth retrying."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )

    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError | ResponseStreamingError):
        return True
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code")) in _TRANSIENT_CODES
    if isinstance(exc, S3UploadFailedError):  # boto3 wraps the ClientError of a failed (multipart) upload
        return exc.__context__ is not None and _transient(exc.__context__)
    return False


def _s3(what: str, call: Callable[[], T]) -> T:
    """Run an S3 call, riding out transient errors with exponential backoff for up to ``retry_limit_s()``.

    Other errors, and an outage longer than the limit, raise ``StorageError`` that says what was being done.
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    start, delay, limit = time.monotonic(), 0.5, retry_limit_s()
    while True:
        try:
            return call()
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            waited = time.monotonic() - start
            if not _transient(exc):
                raise StorageError(redact.text(f"{what}: {exc}")) from exc
            if waited >= limit:
                raise StorageError(
                    redact.text(
                        f"{what}: S3 unreachable for {waited:.0f}s, longer than the retry limit of {limit:.0f}s "
                        f"(cpt.s3_retry_s); last error: {exc}"
                    )
                ) from exc
            pause = min(delay, 8.0, limit - waited)
            log.warning("%s; retrying in %.1fs (gives up after %.0fs)", redact.text(f"{what}: {exc}"), pause, limit)
            time.sleep(pause)
            delay *= 2


def is_s3(path: str) -> bool:
    return str(path).startswith(S3)


def split_s3(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client():
    """This thread's S3 client for the current ``S3_ENDPOINT_URL``: built once, from a session of its own."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") or None
    clients = _local.__dict__.setdefault("clients", {})
    if endpoint not in clients:
        import boto3
        from botocore.config import Config

        cfg = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=60)  # see _s3
        clients[endpoint] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)
    return clients[endpoint]


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def match_inputs(patterns: list[str]) -> list[str]:
    """Expand local globs and ``s3://`` globs into a sorted, de-duplicated list of files."""
    found: list[str] = []
    for pattern in patterns:
        matches = _expand_s3(pattern) if is_s3(pattern) else _expand_local(pattern)
        if not matches:
            raise StorageError(f"input not found: {pattern!r} matches no file")
        found.extend(matches)
    return sorted(set(found))


def _expand_local(pattern: str) -> list[str]:
    if glob.has_magic(pattern):
        return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    return [pattern] if os.path.isfile(pattern) else []


def _expand_s3(pattern: str) -> list[str]:
    bucket, key = split_s3(pattern)
    magic = glob.has_magic(key)
    prefix = key
    if magic:
        prefix = key[: min(key.index(c) for c in "*?[" if c in key)]
    out = []
    for obj in _list_s3(bucket, prefix):
        if (magic and fnmatch.fnmatchcase(obj, key)) or (not magic and obj == key):
            out.append(f"{S3}{bucket}/{obj}")
    return out


def _list_s3(bucket: str, prefix: str) -> list[str]:
    return [key for key, _ in _list_s3_objects(bucket, prefix)]


def _list_s3_objects(bucket: str, prefix: str) -> list[tuple[str, str]]:
    """``(key, ETag)`` of every object under ``prefix``."""

    def call():
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [(obj["Key"], obj["ETag"]) for page in pages for obj in page.get("Contents", [])]

    return _s3(f"cannot list s3://{bucket}/{prefix}", call)


def _folder_prefix(key: str) -> str:
    return key.rstrip("/") + "/" if key else ""


def list_prefix(url: str) -> list[str]:
    """Keys (relative to ``url``) of every object or file under ``url``, at any depth."""
    return sorted(listing(url))


def listing(url: str) -> dict[str, str]:
    """``{relative key: version}`` of every object or file under ``url``: the ETag on S3, size and mtime locally.

    Two listings of a folder are equal only if no file was added, removed or replaced in between."""
    if is_s3(url):
        bucket, key = split_s3(url)
        prefix = _folder_prefix(key)
        return {k[len(prefix) :]: etag for k, etag in _list_s3_objects(bucket, prefix)}
    root = Path(url)
    if not root.is_dir():
        return {}
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def list_children(url: str) -> tuple[list[str], list[str]]:
    """``(files, folders)`` directly inside ``url``, never deeper; names only, sorted."""
    if is_s3(url):
        bucket, key = split_s3(url)
        prefix = _folder_prefix(key)

        def call():
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            files, folders = [], []
            for page in pages:
                files += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
                folders += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            return sorted(f for f in files if f), sorted(folders)

        return _s3(f"cannot list {url}", call)
    if not os.path.isdir(url):
        return [], []
    entries = sorted(os.scandir(url), key=lambda e: e.name)
    return [e.name for e in entries if e.is_file()], [e.name for e in entries if e.is_dir()]


def size(path: str) -> int:
    if is_s3(path):
        bucket, key = split_s3(path)
        return int(_s3(f"cannot stat {path}", lambda: s3_client().head_object(Bucket=bucket, Key=key))["ContentLength"])
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise StorageError(f"cannot stat {path}: {exc.strerror}") from exc


def etag(url: str) -> str:
    """An ``s3://`` object's ETag: changes whenever the object is replaced."""
    bucket, key = split_s3(url)
    return str(_s3(f"cannot stat {url}", lambda: s3_client().head_object(Bucket=bucket, Key=key))["ETag"])


def exists(path: str) -> bool:
    if not is_s3(path):
        return os.path.exists(path)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(path)

    def call() -> bool:
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    return _s3(f"cannot reach {path}", call)


class _S3Reader(io.RawIOBase):
    """An S3 object as a stream that survives dropped connections: a read that fails part-way asks again for
    the rest (``Range: bytes=<pos>-``, same ETag), with ``_s3``'s backoff and limit."""

    def __init__(self, url: str):
        self.url, (self.bucket, self.key) = url, split_s3(url)
        first = _s3(f"cannot read {url}", lambda: s3_client().get_object(Bucket=self.bucket, Key=self.key))
        self.body, self.etag, self.size, self.pos = first["Body"], first["ETag"], first["ContentLength"], 0

    def readable(self) -> bool:
        return True

    def _where(self) -> str:
        return f"cannot read {self.url} at byte {self.pos:,} of {self.size:,}"

    def _chunk(self, n: int) -> bytes:
        from botocore.exceptions import ClientError, IncompleteReadError

        if self.body is None:
            rest = f"bytes={self.pos}-"
            try:
                answer = s3_client().get_object(Bucket=self.bucket, Key=self.key, Range=rest, IfMatch=self.etag)
            except ClientError as exc:  # IfMatch: the object was replaced since the first request
                if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    raise StorageError(f"{self._where()}: the object was replaced while being read") from exc
                raise
            self.body = answer["Body"]
        try:
            data = self.body.read(n)
            if not data:  # the connection closed early without an error
                raise IncompleteReadError(actual_bytes=self.pos, expected_bytes=self.size)
        except Exception:
            self.body.close()
            self.body = None
            raise
        return data

    def readinto(self, buf) -> int:
        if self.pos >= self.size:
            return 0
        want = min(len(buf), self.size - self.pos)
        data = _s3(self._where(), lambda: self._chunk(want))
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while chunk := self.read(8 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if getattr(self, "body", None) is not None:
            self.body.close()
            self.body = None
        super().close()


def open_binary(path: str):
    """A readable binary stream over a local file or an S3 object (streamed, not loaded)."""
    if is_s3(path):
        return _S3Reader(path)
    try:
        return open(path, "rb")
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc


def read_bytes(path: str) -> bytes:
    with open_binary(path) as fh:
        return fh.read()


def write_bytes(path: str, data: bytes) -> None:
    if is_s3(path):
        bucket, key = split_s3(path)
        _s3(f"cannot write {path}", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    try:
        os.replace(_local_tmp(path, data), path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


def _local_tmp(path: str, data: bytes) -> str:
    """``data`` in a new file beside ``path`` whose name no other writer uses."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    return tmp


# ---- conditional writes: exactly one writer wins ---------------------------------------------------------


def _precondition_failed(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _local_version(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def create_new(path: str, data: bytes) -> str | None:
    """Write ``path`` only if it does not exist; the new version, or None when it already existed.

    S3: ``If-None-Match: *``. Locally: the content goes to a private temporary file that is hard-linked to
    ``path`` (``link`` fails if ``path`` exists), so the file never appears half-written."""
    if is_s3(path):
        bucket, key = split_s3(path)

        def call() -> str | None:
            from botocore.exceptions import ClientError

            try:
                return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
            except ClientError as exc:
                if _precondition_failed(exc):
                    return None
                raise

        return _s3(f"cannot create {path}", call)
    try:
        tmp = _local_tmp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from exc
    return _local_version(data)


def read_versioned(path: str) -> tuple[bytes, str] | None:
    """``(content, version)`` of ``path``, or None when it does not exist."""
    if is_s3(path):
        bucket, key = split_s3(path)

        def call():
            from botocore.exceptions import ClientError

            try:
                answer = s3_client().get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return answer["Body"].read(), answer["ETag"]

        return _s3(f"cannot read {path}", call)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    return data, _local_version(data)


def replace_if(path: str, data: bytes, version: str) -> str | None:
    """Overwrite ``path`` only if it is still at ``version``; the new version, or None when it changed.

    S3: ``If-Match`` on the ETag. Locally: under an exclusive ``flock`` of ``<path>.flock`` (never followed
    through a symlink), held by every cpt writer of that file."""
    if is_s3(path):
        bucket, key = split_s3(path)

        def call() -> str | None:
            from botocore.exceptions import ClientError

            try:
                return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
            except ClientError as exc:
                if _precondition_failed(exc) or exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    return None
                raise

        return _s3(f"cannot replace {path}", call)
    import fcntl

    try:
        fd = os.open(f"{path}.flock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = read_versioned(path)
            if now is None or now[1] != version:
                return None
            os.replace(_local_tmp(path, data), path)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot replace {path}: {exc.strerror}") from exc
    return _local_version(data)


def delete(path: str) -> None:
    """Remove a file or object; a missing one is not an error."""
    if is_s3(path):
        bucket, key = split_s3(path)
        _s3(f"cannot delete {path}", lambda: s3_client().delete_object(Bucket=bucket, Key=key))
    elif os.path.exists(path):
        os.remove(path)


def delete_folder(url: str) -> None:
    """Remove a folder and everything under it; a missing one is not an error."""
    if is_s3(url):
        for key in list_prefix(url):
            delete(join(url, key))
    else:
        shutil.rmtree(url, ignore_errors=True)


def upload_file(local: str, url: str, progress: Callable[[int], None] | None = None) -> None:
    """Copy ``local`` to ``url``; an S3 object appears whole or not at all. ``progress`` gets byte increments."""
    if not is_s3(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{url}.part{os.getpid()}"
        shutil.copyfile(local, tmp)
        os.replace(tmp, url)
        return
    bucket, key = split_s3(url)
    _s3(f"cannot upload {local} to {url}", lambda: s3_client().upload_file(local, bucket, key, Callback=progress))


def download_file(url: str, local: str) -> None:
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(url):
        shutil.copyfile(url, local)
        return
    bucket, key = split_s3(url)
    tmp = f"{local}.part{os.getpid()}"
    _s3(f"cannot download {url}", lambda: s3_client().download_file(bucket, key, tmp))
    os.replace(tmp, local)


def upload_folder(local: str, url: str) -> list[str]:
    """Copy every file under the local folder ``local`` to ``url`` (local or ``s3://``); returns the keys."""
    keys = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    for key in keys:
        upload_file(os.path.join(local, key), join(url, key))
    return keys


class Destination:
    """Where a command writes a folder. Everything is written into a private temporary folder first and published
    at ``close``: locally by a rename, on ``s3://`` by an upload that ends with ``DONE`` (a failed upload removes
    what it sent). An OUT that already holds what would be written (``files``; None: anything) is refused unless
    ``overwrite``, which clears it first; an OUT that is a file is refused. A local path that looks like a
    mistyped URL (``s3:/b``, ``S3://b``, ``s3//b``) is refused: it would become a local folder named ``s3:``."""

    DONE = ".cpt-complete"

    def __init__(self, url: str, what: str, overwrite: bool = False, files: list[str] | None = None):
        check_not_mistyped_url(url, what)
        self.url, self.files = url.rstrip("/") or url, files
        present = self._present(what)
        clash = sorted(present if files is None else set(files) & set(present))
        if clash and not overwrite:
            raise StorageError(
                f"{what}: {url} already holds {clash[0]}{' and more' if len(clash) > 1 else ''}; choose a new "
                "folder, or pass --overwrite (which clears it first)"
            )
        self._clear = clash
        parent = None if is_s3(url) else (os.path.dirname(os.path.abspath(url)) or ".")
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=".cpt-out-", dir=parent)
        self.local = self._tmp

    def _present(self, what: str) -> list[str]:
        if is_s3(self.url):
            return [k for k in list_prefix(self.url) if k != self.DONE]
        if os.path.lexists(self.url) and not os.path.isdir(self.url):
            raise StorageError(f"{what}: {self.url} is a file, not a folder")
        return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []

    def __enter__(self) -> str:
        return self.local

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._publish()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _publish(self) -> None:
        if not is_s3(self.url):
            if self.files is None:
                shutil.rmtree(self.url, ignore_errors=True)  # empty, or cleared by --overwrite
                os.replace(self._tmp, self.url)
                return
            os.makedirs(self.url, exist_ok=True)
            for name in os.listdir(self._tmp):
                target = os.path.join(self.url, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(self._tmp, name), target)
            return
        for key in self._clear:
            delete(join(self.url, key))
        delete(join(self.url, self.DONE))
        sent: list[str] = []
        try:
            for key in sorted(str(p.relative_to(self._tmp)) for p in Path(self._tmp).rglob("*") if p.is_file()):
                upload_file(os.path.join(self._tmp, key), join(self.url, key))
                sent.append(key)
            write_bytes(join(self.url, self.DONE), b"")
        except BaseException:
            for key in sent:  # no half folder stays behind
                try:
                    delete(join(self.url, key))
                except StorageError as exc:
                    log.warning("could not remove %s after a failed upload: %s", join(self.url, key), exc)
            raise


def check_not_mistyped_url(path: str, what: str) -> None:
    """``StorageError`` when a path that is not ``s3://...`` starts like one (``s3:/``, ``S3://``, ``s3//``)."""
    text = str(path)
    if is_s3(text):
        split_s3(text)
        return
    if text.lower().startswith(("s3:", "s3/")):
        raise StorageError(f"{what}: {text!r} is neither a local path nor an s3:// URL (did you mean s3://...?)")


def local_only(path: str, what: str) -> str:
    """``path`` when it is local; a clear ``StorageError`` for an ``s3://`` URL (or a mistyped one)."""
    check_not_mistyped_url(path, what)
    if is_s3(path):
        raise StorageError(f"{what}: {path} must be a local path (this command does not write to s3://)")
    return path


def check_writable(url: str) -> None:
    """Fail fast when ``url`` cannot be written: a probe object is written and deleted."""
    probe = join(url, ".cpt-write-probe")
    if is_s3(url):
        bucket, key = split_s3(probe)
        client = s3_client()

        def call():
            client.put_object(Bucket=bucket, Key=key, Body=b"")
            client.delete_object(Bucket=bucket, Key=key)

        _s3(f"output {url} is not writable", call)
        return
    try:
        Path(url).mkdir(parents=True, exist_ok=True)
        Path(probe).write_bytes(b"")
        Path(probe).unlink()
    except OSError as exc:
        raise StorageError(f"output {url} is not writable: {exc.strerror} ({exc.filename})") from exc
