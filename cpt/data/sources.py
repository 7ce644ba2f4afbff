"""Reading JSONL inputs: local or ``s3://``, plain, ``.zst`` or ``.gz``, with 1-based line numbers."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator

from cpt.io import storage

SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json", ".json.zst", ".json.gz")


class InputError(ValueError):
    """Bad input; the message names the file and line."""

    def __init__(self, path: str, line: int | None, reason: str, detail: str):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {detail}")
        self.path, self.line, self.reason, self.detail = path, line, reason, detail

    def __reduce__(self):  # survives the trip back from a worker process
        return InputError, (self.path, self.line, self.reason, self.detail)


def check_suffix(path: str) -> None:
    if not path.endswith(SUFFIXES):
        raise InputError(path, None, "unsupported_format", f"unsupported input format; expected one of {SUFFIXES}")


def _decompressed(path: str, raw):
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    return raw


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for every line, streamed; errors name the file."""
    check_suffix(path)
    try:
        raw = storage.open_binary(path)
    except storage.StorageError as exc:
        raise InputError(path, None, "unreadable_file", str(exc)) from exc
    lineno = 0
    try:
        with io.BufferedReader(_decompressed(path, raw), buffer_size=1 << 20) as stream:
            for lineno, line in enumerate(stream, start=1):
                yield lineno, line
    except (OSError, EOFError) as exc:
        raise InputError(path, lineno + 1, "unreadable_file", f"cannot read: {exc}") from exc
    except Exception as exc:  # zstandard raises its own ZstdError
        if type(exc).__name__ == "ZstdError":
            raise InputError(path, lineno + 1, "unreadable_file", f"corrupt zstd stream: {exc}") from exc
        raise
