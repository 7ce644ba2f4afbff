"""Local paths and ``s3://`` URLs behind one small interface.

The S3 client honours ``S3_ENDPOINT_URL`` (the same variable mosaicml-streaming reads), so tests and
on-prem object stores work without code changes.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

S3 = "s3://"


class StorageError(RuntimeError):
    """A path or bucket cannot be read or written; the message names it."""


@contextmanager
def _s3_errors(what: str):
    """botocore's errors, re-raised as ``StorageError`` that says what was being done."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"{what}: {exc}") from exc


def is_s3(path: str) -> bool:
    return str(path).startswith(S3)


def split_s3(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client():
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=cfg)


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def expand(patterns: list[str]) -> list[str]:
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
    with _s3_errors(f"cannot list s3://{bucket}/{prefix}"):
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def list_prefix(url: str) -> list[str]:
    """Keys (relative to ``url``) of every object or file under ``url``."""
    if is_s3(url):
        bucket, key = split_s3(url)
        prefix = key.rstrip("/") + "/" if key else ""
        return [k[len(prefix) :] for k in _list_s3(bucket, prefix)]
    root = Path(url)
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def size(path: str) -> int:
    if is_s3(path):
        bucket, key = split_s3(path)
        with _s3_errors(f"cannot stat {path}"):
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise StorageError(f"cannot stat {path}: {exc.strerror}") from exc


def exists(path: str) -> bool:
    if not is_s3(path):
        return os.path.exists(path)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(path)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StorageError(f"cannot reach {path}: {exc}") from exc


def open_binary(path: str):
    """A readable binary stream over a local file or an S3 object (streamed, not loaded)."""
    if is_s3(path):
        bucket, key = split_s3(path)
        with _s3_errors(f"cannot read {path}"):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
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
        with _s3_errors(f"cannot write {path}"):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


def delete(path: str) -> None:
    """Remove a file or object; a missing one is not an error."""
    if is_s3(path):
        bucket, key = split_s3(path)
        with _s3_errors(f"cannot delete {path}"):
            s3_client().delete_object(Bucket=bucket, Key=key)
    elif os.path.exists(path):
        os.remove(path)


def upload_file(local: str, url: str) -> None:
    if not is_s3(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, url)
        return
    bucket, key = split_s3(url)
    with _s3_errors(f"cannot upload {local} to {url}"):
        s3_client().upload_file(local, bucket, key)


def download_file(url: str, local: str) -> None:
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(url):
        shutil.copyfile(url, local)
        return
    bucket, key = split_s3(url)
    tmp = f"{local}.part{os.getpid()}"
    with _s3_errors(f"cannot download {url}"):
        s3_client().download_file(bucket, key, tmp)
    os.replace(tmp, local)


def check_writable(url: str) -> None:
    """Fail fast when ``url`` cannot be written: a probe object is written and deleted."""
    probe = join(url, ".cpt-write-probe")
    if is_s3(url):
        bucket, key = split_s3(probe)
        client = s3_client()
        with _s3_errors(f"output {url} is not writable"):
            client.put_object(Bucket=bucket, Key=key, Body=b"")
            client.delete_object(Bucket=bucket, Key=key)
        return
    try:
        Path(url).mkdir(parents=True, exist_ok=True)
        Path(probe).write_bytes(b"")
        Path(probe).unlink()
    except OSError as exc:
        raise StorageError(f"output {url} is not writable: {exc.strerror} ({exc.filename})") from exc
