"""The trust boundary: every byte cpt reads back from a bucket or a shared folder passes here first.

A bucket is written by many people and jobs, and a run's own records (``cpt-run.json``, markers, manifests,
indices, ``metrics.jsonl``) may have been written by someone else. So nothing read back is used before this
module has checked its names, sizes and types:

- ``key``: a name from a listing or a record that becomes a local path: relative, no ``..``/``.``/empty
  segment, no backslash or NUL, inside its root;
- ``read``/``record``: a remote file's size checked before it is fetched, then JSON of the expected type;
- ``jsonl``: a JSON-lines file read row by row, each line bounded, errors naming ``file:line``;
- ``lines``: any text stream split into lines of bounded length;
- ``index``: a streaming ``index.json`` whose every shard basename is a safe relative key (streaming
  downloads a shard to whatever its basename says);
- ``run_spec``: a recorded launch, which may never grant what the user did not grant on the command line;
- ``checkpoint``: pickles, through ``cpt.io.safe_load`` (the restricted unpickler and loader).

Every refusal is an ``UntrustedError`` (a ``ValueError``) whose one line names the file, line or key.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from typing import Any

from cpt.io import storage

RECORD_BYTES = 16 << 20  # a record cpt wrote itself: a manifest, a marker, an index, cpt-run.json
LINE_BYTES = 16 << 20  # one line of a JSONL record or task file (as the conversion's --max-doc-bytes)
METRICS_BYTES = 1 << 30  # metrics.jsonl: a long run's every logged row


class UntrustedError(ValueError):
    """Something read back from a bucket or a record failed its check; the message names it."""


def key(name: str, what: str) -> str:
    """``name`` when it is a safe relative key (``a/b.mds``), else ``UntrustedError`` naming ``what``."""
    text = str(name)
    parts = text.split("/")
    if (
        not text
        or text.startswith("/")
        or "\\" in text
        or "\0" in text
        or any(p in ("", ".", "..") for p in parts)
        or re.match(r"^[A-Za-z]:", text)
    ):
        raise UntrustedError(f"{what}: refusing the key {text!r}: it would leave its folder (.., ., '', or absolute)")
    return text


def child(root: str, name: str, what: str) -> str:
    """``root/name`` for a key read back, refused when it would land outside ``root``."""
    parts = key(name, what).split("/")
    path = os.path.normpath(os.path.join(root, *parts))
    if os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != os.path.abspath(root):
        raise UntrustedError(f"{what}: refusing the key {name!r}: it would be written outside {root}")
    return path


def folder(path: str) -> str:
    """A folder named on the command line, normalised: ``s3://b/a/../c/`` -> ``s3://b/c``, ``./x/`` -> ``x``.

    Records never name where cpt writes: a branch's or stage's folder derives from this."""
    text = str(path).rstrip("/")
    if storage.is_s3(text):
        bucket, prefix = storage.split_s3(text)
        parts = []
        for p in prefix.split("/"):
            if p in ("", "."):
                continue
            if p == "..":
                if not parts:
                    raise UntrustedError(f"{path}: '..' climbs out of the bucket")
                parts.pop()
            else:
                parts.append(p)
        return "/".join([f"s3://{bucket}", *parts]) if parts else f"s3://{bucket}"
    return os.path.normpath(text)


def inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it, both normalised (never a string prefix test)."""
    p, r = folder(path), folder(root)
    if storage.is_s3(p) != storage.is_s3(r):
        return False
    if storage.is_s3(p):
        return p == r or p.startswith(r + "/")
    return os.path.commonpath([os.path.abspath(p), os.path.abspath(r)]) == os.path.abspath(r)


def regular(path: str, what: str) -> int:
    """The size of a local ``path`` that is a regular file (not a link, FIFO or device: those hang, never end, or
    lead elsewhere), else ``UntrustedError``."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UntrustedError(f"{what}: {path} is missing ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedError(f"{what}: {path} is not a regular file (a link, FIFO or device)")
    return st.st_size


def read(url: str, what: str, limit: int = RECORD_BYTES) -> bytes:
    """A remote or local file's bytes, its size checked first: a file over ``limit`` is refused unread."""
    if not storage.is_s3(url) and os.path.lexists(url):
        regular(url, what)
    n = storage.size(url)
    if n > limit:
        raise UntrustedError(f"{url}: {what} is {n:,} bytes, over the limit of {limit:,}")
    data = storage.read_bytes(url)
    if len(data) > limit:  # replaced between the two calls
        raise UntrustedError(f"{url}: {what} grew over the limit of {limit:,} bytes while being read")
    return data


def parse(data: bytes, where: str, kind: type = dict) -> Any:
    """JSON of the expected top-level type, or ``UntrustedError`` naming ``where``."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UntrustedError(f"{where}: not valid JSON ({exc})"[:400]) from None
    if not isinstance(value, kind):
        raise UntrustedError(f"{where}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def record(url: str, what: str, kind: type = dict, limit: int = RECORD_BYTES) -> Any:
    """A JSON record read back (``read`` then ``parse``)."""
    return parse(read(url, what, limit), url, kind)


def field(obj: dict, name: str, kind: type | tuple, where: str) -> Any:
    """``obj[name]`` of the expected type (a bool is never an int), or ``UntrustedError`` naming the key."""
    if name not in obj:
        raise UntrustedError(f"{where}: missing key {name!r}")
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise UntrustedError(f"{where}: {name!r} must be a {names}, got {type(value).__name__}")
    return value


def lines(stream: Iterable[bytes] | Any, where: str, limit: int = LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of a binary stream, each line read in bounded pieces: a line over ``limit``
    bytes is refused naming ``where:line``, having held at most ``limit`` bytes of it."""
    number = 0
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit:
            raise UntrustedError(f"{where}:{number}: a line of more than {limit:,} bytes; refusing the file")
        yield number, line


def jsonl(
    url: str, what: str, limit: int = METRICS_BYTES, line_limit: int = LINE_BYTES, tolerate_last: bool = False
) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` of a JSON-lines file: the file's size checked first, every line bounded, every row
    an object; a bad row is ``UntrustedError`` naming ``file:line``. ``tolerate_last``: a last line without its
    newline that does not parse (a writer killed mid-line) is dropped."""
    n = storage.size(url)
    if n > limit:
        raise UntrustedError(f"{url}: {what} is {n:,} bytes, over the limit of {limit:,}")
    with storage.open_binary(url) as raw:
        stream = raw if isinstance(raw, io.BufferedIOBase) else io.BufferedReader(raw, 1 << 20)
        for number, line in lines(stream, url, line_limit):
            if not line.strip():
                continue
            try:
                row = parse(line, f"{url}:{number}", dict)
            except UntrustedError:
                if tolerate_last and not line.endswith(b"\n") and not stream.peek(1):
                    return
                raise
            yield number, row


# ---- streaming indices ---------------------------------------------------------------------------------------


def index(data: bytes, where: str) -> dict:
    """A streaming ``index.json``: a version and a list of shards whose every basename is a safe relative key."""
    body = parse(data, where, dict)
    shards = field(body, "shards", list, where)
    for i, shard in enumerate(shards):
        at = f"{where}: shards[{i}]"
        if not isinstance(shard, dict):
            raise UntrustedError(f"{at}: expected an object")
        for part in ("raw_data", "zip_data"):
            info = shard.get(part)
            if info is None:
                continue
            if not isinstance(info, dict):
                raise UntrustedError(f"{at}.{part}: expected an object")
            key(field(info, "basename", str, f"{at}.{part}"), f"{at}.{part}.basename")
            size = info.get("bytes")
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
                raise UntrustedError(f"{at}.{part}.bytes: expected a non-negative integer")
        if shard.get("raw_data") is None:
            raise UntrustedError(f"{at}: no raw_data")
    return body


def read_index(split: str) -> dict:
    """``<split>/index.json``, checked (``index``)."""
    url = storage.join(split, "index.json")
    return index(read(url, "the index"), url)


# ---- a recorded launch (cpt-run.json) -------------------------------------------------------------------------

# What a recorded launch may never turn on or point elsewhere: only this command line grants it.
GRANTS = ("cpt.trust_remote_code", "cpt.allow_fingerprint_change")
_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")


def run_spec(data: bytes, where: str) -> dict:
    """``cpt-run.json``: ``{"yaml": text, "overrides": [key=value, ...]}``, no resolvers, nothing granted."""
    spec = parse(data, where, dict)
    text = field(spec, "yaml", str, where)
    overrides = field(spec, "overrides", list, where)
    for i, o in enumerate(overrides):
        if not isinstance(o, str) or "=" not in o:
            raise UntrustedError(f"{where}: overrides[{i}] is not key=value")
    for source in (text, *overrides):
        m = _RESOLVER.search(source)
        if m:
            raise UntrustedError(
                f"{where}: the recorded launch uses the resolver ${{{m.group(1)}:...}}; a record may not read the "
                "environment or decode values. Launch the branch from a YAML of your own"
            )
    named = [o.split("=", 1)[0].strip() for o in overrides]
    if re.search(r"(^|\n)\s*code_paths\s*:", text) or any(n.split(".")[-1] == "code_paths" for n in named):
        raise UntrustedError(f"{where}: the recorded launch sets code_paths, which imports files: refused")
    return spec


def granted(cfg: Any, where: str) -> None:
    """``UntrustedError`` when a recorded config turns on what only a command line may (``GRANTS``) or sets
    llm-foundry's ``code_paths`` anywhere."""
    from omegaconf import OmegaConf

    for name in GRANTS:
        if OmegaConf.select(cfg, name, default=False):
            raise UntrustedError(f"{where}: the recorded launch sets {name}: true; a record never grants it")
    for path in _paths(OmegaConf.to_container(cfg, resolve=False)):
        if path.split(".")[-1] == "code_paths":
            raise UntrustedError(f"{where}: the recorded launch sets {path}, which imports files: refused")


def _paths(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{prefix}.{k}" if prefix else str(k)
            yield here
            yield from _paths(v, here)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, f"{prefix}[{i}]")
