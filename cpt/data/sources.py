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


class _Zstd(io.RawIOBase):
    """A ``.zst`` stream of one or more frames whose end is checked: input that stops inside a frame raises
    ``EOFError`` (zstandard's own stream reader returns what it has and ends quietly).

    Compressed bytes are fed ``PIECE`` at a time, so one call's output is bounded (a zstd block expands at most
    about 26,000 times: 1 KiB gives at most ~27 MB) and a decompression bomb never sits in memory whole."""

    PIECE = 1 << 10

    def __init__(self, raw):
        import zstandard

        self.raw, self.make = raw, zstandard.ZstdDecompressor().decompressobj
        self.dobj, self.pending, self.pos, self.fed = self.make(), b"", 0, False
        self.inbuf, self.inpos = b"", 0

    def readable(self) -> bool:
        return True

    def _piece(self) -> bytes:
        if self.inpos >= len(self.inbuf):
            self.inbuf, self.inpos = self.raw.read(1 << 20), 0
        piece = self.inbuf[self.inpos : self.inpos + self.PIECE]
        self.inpos += len(piece)
        return piece

    def readinto(self, buf) -> int:
        while self.pos >= len(self.pending):
            piece = self._piece()
            if not piece:
                if self.fed and not self.dobj.eof:
                    raise EOFError("the compressed input ends inside a zstd frame: the file is truncated")
                return 0
            self.fed = True
            self.pending, self.pos = self.dobj.decompress(piece), 0
            if self.dobj.eof:  # a frame ended: what follows starts the next one
                rest = self.dobj.unused_data
                self.inbuf, self.inpos = rest + self.inbuf[self.inpos :], 0
                self.dobj, self.fed = self.make(), False
        n = min(len(buf), len(self.pending) - self.pos)
        buf[:n] = memoryview(self.pending)[self.pos : self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decompressed(path: str, raw):
    if path.endswith(".zst"):
        return _Zstd(raw)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    return raw


def iter_lines(path: str, max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for every line, streamed; errors name the file.

    A line longer than ``max_line_bytes`` is yielded cut to ``max_line_bytes + 1`` bytes (so a caller sees it is
    too long) and the rest of it is read and dropped in pieces: memory stays bounded whatever the input."""
    check_suffix(path)
    try:
        raw = storage.open_binary(path)
    except storage.StorageError as exc:
        raise InputError(path, None, "unreadable_file", str(exc)) from exc
    lineno = 0
    try:
        with io.BufferedReader(_decompressed(path, raw), buffer_size=1 << 20) as stream:
            limit = -1 if max_line_bytes is None else max_line_bytes + 1
            while line := stream.readline(limit):
                lineno += 1
                if limit > 0 and len(line) == limit and not line.endswith(b"\n"):
                    while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                yield lineno, line
    except EOFError as exc:  # gzip's, or _Zstd's: the file was cut; what came after the cut cannot be counted
        raise InputError(
            path, lineno + 1, "truncated_file", f"the compressed file is truncated after line {lineno} ({exc})"
        ) from exc
    except OSError as exc:
        raise InputError(path, lineno + 1, "unreadable_file", f"cannot read: {exc}") from exc
    except Exception as exc:  # zstandard raises its own ZstdError
        if type(exc).__name__ == "ZstdError":
            raise InputError(path, lineno + 1, "unreadable_file", f"corrupt zstd stream: {exc}") from exc
        raise
