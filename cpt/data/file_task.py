"""One unit of a conversion: one input file -> its domains' full samples, its tails, and a completion marker.

The canonical layout (``file-packed``), the same whichever engine runs the tasks and however many workers:

- each input file ``i`` (in the sorted input order) is read alone. Each domain's token stream of that file (EOS, id
  0, after every document) is cut into samples of exactly ``seq_len`` tokens, written as the MDS dataset
  ``<split>/<domain>/f<i>/``;
- what is left of each domain (under ``seq_len`` tokens, its *tail*) goes into the file's marker;
- the driver (``cpt.data.convert``) packs each domain's tails, in input order, as ``<split>/<domain>/tails/``.
  Only the last partial sample of each domain is dropped, and counted.

A task reads its input (local or ``s3://``) as a stream and writes its output to the destination (local or
``s3://``); its local disk holds only its own file's tokens (2 bytes each) and, for an ``s3://`` destination, one
domain's samples of that file while they are written and sent. The
marker ``<split>/.convert/<i>-<key>.json`` is written last, so a task without one has no output that counts: a
rerun (or Ray's retry of a killed worker) writes the same bytes again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import types
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from cpt.data import sources
from cpt.data.manifest import COLUMN, DTYPE, DomainStats, slugify
from cpt.data.tokenizer import EOS_TOKEN
from cpt.io import storage, untrusted
from cpt.io.cache import cache_dir

MAX_DOC_BYTES = 16 << 20  # a longer JSON line is skipped ("too_large") or stops the run: memory stays bounded
MAX_SLUG = 100  # characters in a domain's folder name
MAX_DOMAINS = 512  # domains in one file: each holds an open file while the file converts (ulimit -n is often 1024)
BATCH_BYTES = 4 << 20  # texts per encode_batch call, by size
PACK_CHUNK = 1 << 22  # tokens read per step when packing
MARKERS = ".convert"  # <split>/.convert/: one marker per finished task, removed when the split is complete
# "<file index>:<flag file>": the worker converting that file kills itself with SIGKILL once, after writing part of
# its output and before its marker (the tests of a worker lost mid-task; the flag file makes it once)
FAULT = "CPT_CONVERT_FAULT"


@dataclass
class FileTask:
    index: int  # the file's place in the sorted inputs: its output folder is f<index>
    path: str
    key: str  # the file (path, size) and every setting that shapes its output
    split_root: str
    tokenizer: str  # the tokenizer.json text: a worker on another node has no copy of the driver's file
    domain_key: str
    skip_bad_lines: bool
    seq_len: int
    size_limit: int | str
    compression: str | None
    max_doc_bytes: int = MAX_DOC_BYTES
    threads: int = 1  # the tokenizer's threads

    @property
    def marker(self) -> str:
        return storage.join(self.split_root, MARKERS, f"{self.index:05d}-{self.key}.json")

    @property
    def part(self) -> str:
        return f"f{self.index:05d}"


@dataclass
class FileResult:
    domains: dict[str, dict] = field(default_factory=dict)  # name -> DomainStats as dict (samples: this file's)
    unattributed_skipped: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, int] = field(default_factory=dict)  # name -> the line it first appeared on
    tails: dict[str, str] = field(default_factory=dict)  # name -> the tail's uint16 tokens, base64


def part_name(domain: str) -> str:
    """A domain's token file in a task's scratch folder: by its name, so that two names never share one."""
    return hashlib.sha256(domain.encode("utf-8", "surrogatepass")).hexdigest()[:16] + ".bin"


def tail_tokens(result: FileResult, name: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(result.tails.get(name, "")), dtype=np.uint16)


# ---- the task ------------------------------------------------------------------------------------------------

_progress = None  # set in a local worker: a queue of (docs, tokens)


def set_progress(queue) -> None:
    global _progress
    _progress = queue


def run(task: FileTask, tokenizer: str | None = None) -> FileResult:
    """Convert one file; returns what its marker holds. Raises ``InputError`` (file and line) on a bad line
    unless ``skip_bad_lines``. ``tokenizer`` (the JSON text) replaces the task's own, as Ray hands it over."""
    if tokenizer is not None:
        task = replace(task, tokenizer=tokenizer)
    scratch = tempfile.mkdtemp(prefix=f"{task.part}-", dir=cache_dir("convert-scratch"))
    try:
        result, stats = _tokenize(task, scratch)
        for name, s in stats.items():
            samples, tail = _pack(task, name, os.path.join(scratch, part_name(name)))
            s.samples = samples
            result.tails[name] = base64.b64encode(tail.tobytes()).decode()
            _fault(task)
        result.domains = {name: asdict(s) for name, s in stats.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    storage.write_bytes(task.marker, json.dumps(asdict(result)).encode())  # last: the task is done
    return result


def read_marker(task: FileTask) -> FileResult:
    """A finished task's marker, read back from the destination and checked (it holds token ids and counts)."""
    raw = untrusted.record(task.marker, "a conversion task's marker")
    try:
        result = FileResult(**raw)
        if not isinstance(result.domains, dict) or not isinstance(result.tails, dict):
            raise ValueError("domains and tails must be objects")
        _counts(result.unattributed_skipped, "unattributed_skipped")
        _counts(result.first_lines, "first_lines")
        for name, stats in result.domains.items():
            d = DomainStats(**stats)
            _counts({k: getattr(d, k) for k in ("docs_read", "docs_written", "tokens", "samples")}, name)
            _counts(d.docs_skipped, f"{name}.docs_skipped")
            if not isinstance(result.tails.get(name, ""), str) or len(tail_tokens(result, name)) >= task.seq_len:
                raise ValueError(f"the tail of {name!r} is not a string of fewer than seq_len tokens")
    except (TypeError, ValueError, AttributeError) as exc:
        raise untrusted.UntrustedError(f"{task.marker}: not a conversion marker ({exc})") from exc
    return result


def _counts(values, where: str) -> None:
    """``ValueError`` unless ``values`` maps names to non-negative integers."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected an object")
    for key, n in values.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{where}.{key}: {n!r} is not a non-negative integer")


def _fault(task: FileTask) -> None:
    index, _, flag = os.environ.get(FAULT, "").partition(":")
    if index.isdigit() and int(index) == task.index and flag and not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def _report(docs: int, tokens: int) -> None:
    if _progress is not None:
        _progress.put((docs, tokens))


def _tokenize(task: FileTask, scratch: str) -> tuple[FileResult, dict[str, DomainStats]]:
    """Each domain's tokens of the file (EOS after every document) -> ``<scratch>/<part_name(domain)>``."""
    os.environ["RAYON_NUM_THREADS"] = str(task.threads)  # read when this process first encodes
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(task.tokenizer)
    eos = np.array([tok.token_to_id(EOS_TOKEN)], dtype=np.uint16)
    result, stats, handles = FileResult(), {}, {}
    batch: list[tuple[str, str]] = []
    batch_bytes = 0
    # encode batch k on a thread (the Rust tokenizer releases the GIL) while batch k+1 is parsed
    encoder = ThreadPoolExecutor(1)
    pending: tuple[list[tuple[str, str]], Future] | None = None

    def write(done: list[tuple[str, str]], encodings) -> None:
        n_tokens = 0
        for (domain, _), enc in zip(done, encodings):
            ids = np.asarray(enc.ids, dtype=np.uint16)
            fh = handles.get(domain)
            if fh is None:
                fh = handles[domain] = open(os.path.join(scratch, part_name(domain)), "wb")
            fh.write(ids.tobytes())
            fh.write(eos.tobytes())
            stats[domain].tokens += len(ids) + 1
            n_tokens += len(ids) + 1
        _report(len(done), n_tokens)

    def flush() -> None:
        nonlocal batch, batch_bytes, pending
        submitted = None
        if batch:
            texts = [t for _, t in batch]
            submitted = (batch, encoder.submit(tok.encode_batch_fast, texts, add_special_tokens=False))
        if pending is not None:
            write(pending[0], pending[1].result())
        pending, batch, batch_bytes = submitted, [], 0

    slugs: dict[str, str] = {}
    try:
        for lineno, raw in sources.iter_lines(task.path, max_line_bytes=task.max_doc_bytes):
            domain, text, reason, detail = parse_line(raw, task.domain_key, task.max_doc_bytes, slugs)
            if domain is not None:
                if domain not in stats:
                    stats[domain], result.first_lines[domain] = DomainStats(slug=slugify(domain)), lineno
                    slugs[stats[domain].slug] = domain
                stats[domain].docs_read += 1
            if reason is not None:
                if reason not in ("empty", "blank_line") and not task.skip_bad_lines:
                    raise sources.InputError(
                        task.path, lineno, reason, detail + " (use --skip-bad-lines to count and skip)"
                    )
                if domain is None:
                    result.unattributed_skipped[reason] = result.unattributed_skipped.get(reason, 0) + 1
                else:
                    stats[domain].skip(reason)
                continue
            stats[domain].docs_written += 1
            batch.append((domain, text))
            batch_bytes += len(raw)
            if batch_bytes >= BATCH_BYTES:
                flush()
        flush()
        flush()
    finally:
        encoder.shutdown()
        for fh in handles.values():
            fh.close()
    return result, stats


def _mds_writer():
    """mosaicml-streaming's ``MDSWriter``. In a spawned conversion worker it is loaded without running the
    package's ``__init__``, which imports its datasets with torch, transformers and torchvision: 4.4 s per
    process measured here, against 1.4 s for the writer's own modules."""
    if multiprocessing.parent_process() is not None and "streaming" not in sys.modules:
        import importlib.util

        for name in ("streaming", "streaming.base", "streaming.base.format"):
            spec = importlib.util.find_spec(name)
            package = types.ModuleType(name)
            package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
            sys.modules[name] = package
    from streaming.base.format.mds.writer import MDSWriter

    return MDSWriter


def write_samples(out: str, chunks, seq_len: int, size_limit, compression) -> tuple[int, np.ndarray]:
    """Token chunks, in order, cut into samples of ``seq_len`` -> the MDS dataset ``out`` (local or ``s3://``,
    replaced); returns (samples written, the tokens left over)."""
    MDSWriter = _mds_writer()  # noqa: N806
    if storage.is_s3(out):  # written here, then sent with cpt's one cached client (a writer's own costs a client each)
        local = target = tempfile.mkdtemp(prefix="mds-", dir=cache_dir("convert-upload"))
    else:
        shutil.rmtree(out, ignore_errors=True)
        local, target = None, out
    samples = 0
    carry = np.empty(0, dtype=np.uint16)
    try:
        with MDSWriter(
            out=target,
            columns={COLUMN: f"ndarray:{DTYPE}"},
            compression=compression,
            hashes=["sha1", "xxh64"],
            size_limit=size_limit,
            exist_ok=True,
            progress_bar=False,
        ) as writer:
            for data in chunks:
                chunk = np.concatenate([carry, data])
                full = len(chunk) // seq_len * seq_len
                for row in chunk[:full].reshape(-1, seq_len):
                    writer.write({COLUMN: row})
                samples += full // seq_len
                carry = chunk[full:].copy()
        if local:
            storage.upload_folder(local, out)
    finally:
        if local:
            shutil.rmtree(local, ignore_errors=True)
    return samples, carry


def _pack(task: FileTask, name: str, tokens: str) -> tuple[int, np.ndarray]:
    """The file's full samples of one domain -> ``<split>/<domain>/f<i>/``; returns (samples, tail)."""
    size = os.path.getsize(tokens) if os.path.isfile(tokens) else 0  # a domain of empty documents has none
    data = np.memmap(tokens, dtype=np.uint16, mode="r") if size else np.empty(0, np.uint16)
    if len(data) < task.seq_len:
        return 0, np.array(data)  # no full sample: nothing is written for this file
    out = storage.join(task.split_root, slugify(name), task.part)
    chunks = (data[start : start + PACK_CHUNK] for start in range(0, len(data), PACK_CHUNK))
    try:
        return write_samples(out, chunks, task.seq_len, task.size_limit, task.compression)
    finally:
        del data


def parse_line(
    raw: bytes, domain_key: str, max_doc_bytes: int, slugs: dict[str, str]
) -> tuple[str | None, str | None, str | None, str]:
    """-> (domain, text, skip_reason, detail). ``text`` is None when the line is skipped; ``domain`` is None when
    the line names no usable domain. ``slugs`` maps the folder names taken so far to their domain names."""
    if len(raw) > max_doc_bytes:
        return None, None, "too_large", f"a line of more than {max_doc_bytes:,} bytes (--max-doc-bytes)"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, None, "invalid_utf8", f"bytes are not UTF-8 ({exc.reason} at byte {exc.start})"
    if not line.strip():
        return None, None, "blank_line", "blank line"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, None, "malformed_json", f"malformed JSON: {exc.msg} at column {exc.colno}"
    except (ValueError, RecursionError) as exc:  # numbers past Python's digit limit, nesting past its stack
        return None, None, "malformed_json", f"JSON that cannot be read: {type(exc).__name__}: {str(exc)[:120]}"
    if not isinstance(obj, dict):
        return None, None, "malformed_json", f"expected a JSON object, got {type(obj).__name__}"
    domain = _lookup(obj, domain_key)
    if not isinstance(domain, str) or not domain:
        return None, None, "missing_domain", f"missing or non-string domain key {domain_key!r}"
    try:
        slug = slugify(domain)
        domain.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        return None, None, "bad_domain", f"domain {domain[:80]!r}: {exc}"
    if len(slug) > MAX_SLUG:
        return None, None, "bad_domain", f"domain {domain[:80]!r}...: its folder name is over {MAX_SLUG} characters"
    if slugs.get(slug, domain) != domain:
        return None, None, "domain_collision", f"domain {domain!r} has the folder name {slug!r} of {slugs[slug]!r}"
    if slug not in slugs and len(slugs) >= MAX_DOMAINS:  # each domain holds an open file while a file converts
        return None, None, "too_many_domains", f"domain {domain[:80]!r} is one more than {MAX_DOMAINS} in one file"
    if "text" not in obj:
        return domain, None, "missing_text", "missing key 'text'"
    text = obj["text"]
    if not isinstance(text, str):
        return domain, None, "non_string_text", f"'text' is {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a \ud800 escape: the tokenizer refuses it
        return domain, None, "bad_text", f"text the tokenizer cannot take ({exc.reason} at character {exc.start})"
    if not text.strip():
        return domain, None, "empty", "empty document"
    return domain, text, None, ""


def _lookup(obj: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj
