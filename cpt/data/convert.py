"""JSONL documents -> Pythia tokens -> packed ``seq_len`` samples -> one MDS dataset per domain.

Two phases, both parallel over processes:

1. *tokenize*: each input file is read by one worker, documents are tokenized in batches (the Rust
   tokenizer uses the worker's share of the cores), EOS (id 0) is appended, and each domain's tokens
   are appended to a local ``uint16`` file. A finished file is renamed into place atomically, so a
   rerun after a crash skips it.
2. *pack*: per domain, the files' token streams are concatenated in input order, cut into samples of
   exactly ``seq_len`` tokens and written with ``MDSWriter`` (shards hashed, uploaded when remote).
   The final partial sample is dropped and counted.

Then the merged ``index.json`` and, last, ``manifest.json`` are written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import queue as _queue
import shutil
import sys
import time
import types
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

import numpy as np

from cpt.data import sources
from cpt.data.manifest import COLUMN, DTYPE, DomainStats, Manifest, slugify
from cpt.data.manifest import write as write_manifest
from cpt.data.tokenizer import EOS_TOKEN
from cpt.data.tokenizer import describe as describe_tokenizer
from cpt.io import storage, untrusted
from cpt.io.cache import cache_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DOMAIN_KEYS = {"pile": "meta.pile_set_name", "slimpajama": "meta.redpajama_set_name"}
BATCH_BYTES = 4 << 20  # texts per encode_batch call, by size
PACK_CHUNK = 1 << 22  # tokens read per step when packing


@dataclass
class ConvertResult:
    """What a conversion wrote; tests and callers assert on it."""

    split_root: str
    manifest: Manifest
    files_converted: int
    files_reused: int
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.manifest.domains.values())

    @property
    def samples(self) -> int:
        return sum(d.samples for d in self.manifest.domains.values())


MAX_DOC_BYTES = 16 << 20  # a longer JSON line is skipped ("too_large") or stops the run: memory stays bounded
MAX_SLUG = 100  # characters in a domain's folder name
MAX_DOMAINS = 512  # domains in one split: each holds an open file while a file converts (ulimit -n is often 1024)


@dataclass
class _FileTask:
    index: int
    path: str
    out_dir: str  # local work folder for this file
    tokenizer: str
    domain_key: str
    skip_bad_lines: bool
    max_doc_bytes: int = MAX_DOC_BYTES


@dataclass
class _FileResult:
    domains: dict[str, dict] = field(default_factory=dict)  # name -> DomainStats as dict
    unattributed_skipped: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, int] = field(default_factory=dict)  # name -> the line it first appeared on


def _part_name(domain: str) -> str:
    """A domain's token file in a file's work folder: by its name, so that two names never share one."""
    return hashlib.sha256(domain.encode("utf-8", "surrogatepass")).hexdigest()[:16] + ".bin"


def convert(
    inputs: list[str],
    output: str,
    split: str,
    tokenizer: str,
    domain_key: str,
    seq_len: int = 2048,
    workers: int | None = None,
    skip_bad_lines: bool = False,
    size_limit: int | str = "64mb",
    compression: str | None = None,
    work_dir: str | None = None,
    progress: bool = True,
    max_doc_bytes: int = MAX_DOC_BYTES,
) -> ConvertResult:
    """Convert JSONL files into ``<output>/<split>/<domain-slug>/`` MDS datasets plus a merged index.

    ``domain_key`` is a dotted path into each JSON object, e.g. ``meta.pile_set_name``.
    Raises ``InputError`` (file and line) on bad input unless ``skip_bad_lines``.
    """
    start = time.perf_counter()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not domain_key or any(not part for part in domain_key.split(".")):
        raise ValueError(f"domain_key must be a dotted key like 'meta.pile_set_name', got {domain_key!r}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_doc_bytes < 1:
        raise ValueError(f"max_doc_bytes must be >= 1, got {max_doc_bytes}")

    info = describe_tokenizer(tokenizer)
    files = storage.match_inputs(inputs)
    for path in files:
        sources.check_suffix(path)
    split_root = storage.join(output, split)
    storage.check_writable(split_root)
    sizes = [storage.size(p) for p in files]

    job = hashlib.sha256(
        json.dumps([split_root, info.sha256, domain_key, skip_bad_lines, seq_len, max_doc_bytes]).encode()
    ).hexdigest()[:16]
    work = work_dir or cache_dir("convert", job)
    os.makedirs(work, exist_ok=True)
    tasks = []
    for i, (path, nbytes) in enumerate(zip(files, sizes)):
        key = hashlib.sha256(f"{path}\0{nbytes}".encode()).hexdigest()[:16]
        tasks.append(_FileTask(i, path, os.path.join(work, key), info.path, domain_key, skip_bad_lines, max_doc_bytes))

    todo = [t for t in tasks if not os.path.isfile(os.path.join(t.out_dir, "done.json"))]
    log.info(
        "converting %d files (%d already done in %s) with %d workers", len(files), len(tasks) - len(todo), work, workers
    )
    if workers == 1:  # in this process: no spawn, no second import of mosaicml-streaming
        queue, pool = _queue.Queue(), _InlinePool()
        _init_worker(queue)
    else:
        ctx = get_context("spawn")
        queue = ctx.Queue()
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,))
    try:
        _run_tokenize(pool, queue, todo, workers, progress)
        domains, unattributed = _gather(tasks, skip_bad_lines)
        packed = _run_pack(pool, tasks, domains, split_root, seq_len, size_limit, compression)
    finally:
        pool.shutdown(cancel_futures=True)
    for name, (samples, tail) in packed.items():
        domains[name].samples, domains[name].tail_tokens_dropped = samples, tail
    _write_merged_index(split_root, [domains[n].slug for n in sorted(domains)])

    manifest = Manifest(
        split=split,
        seq_len=seq_len,
        eos_id=info.eos_id,
        domain_key=domain_key,
        tokenizer_sha256=info.sha256,
        vocab_size=info.vocab_size,
        domains=domains,
        unattributed_skipped=unattributed,
        inputs=[{"path": p, "bytes": n} for p, n in zip(files, sizes)],
    )
    write_manifest(split_root, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return ConvertResult(split_root, manifest, len(todo), len(tasks) - len(todo), time.perf_counter() - start)


def _gather(tasks: list[_FileTask], skip_bad_lines: bool) -> tuple[dict[str, DomainStats], dict[str, int]]:
    """Sum the per-file counts into per-domain stats. Two names that share a folder name (each file checks its
    own lines as it reads them; this is across files): the one that appears later is an error at its first
    line, or, with ``skip_bad_lines``, its lines are counted as skipped (``domain_collision``)."""
    domains: dict[str, DomainStats] = {}
    unattributed: dict[str, int] = {}
    first: dict[str, tuple[int, int, str]] = {}  # name -> (file index, line, path)
    for task in tasks:
        with open(os.path.join(task.out_dir, "done.json")) as fh:
            res = _FileResult(**json.load(fh))
        for name, stats in res.domains.items():
            domains.setdefault(name, DomainStats(slug=slugify(name))).merge(DomainStats(**stats))
            where = (task.index, res.first_lines.get(name, 0), task.path)
            first[name] = min(first.get(name, where), where)
        for reason, n in res.unattributed_skipped.items():
            unattributed[reason] = unattributed.get(reason, 0) + n
    owner: dict[str, str] = {}
    for name in sorted(domains, key=lambda n: first[n]):
        slug = domains[name].slug
        if slug not in owner:
            owner[slug] = name
            continue
        _, line, path = first[name]
        other = first[owner[slug]]
        detail = f"domain {name!r} has the folder name {slug!r} of domain {owner[slug]!r} ({other[2]}:{other[1]})"
        if not skip_bad_lines:
            raise sources.InputError(path, line, "domain_collision", detail + " (use --skip-bad-lines to skip it)")
        log.warning("%s:%d: %s; its %d lines are skipped", path, line, detail, domains[name].docs_read)
        unattributed["domain_collision"] = unattributed.get("domain_collision", 0) + domains.pop(name).docs_read
    return domains, unattributed


# ---- phase 1: tokenize ---------------------------------------------------------------------------

_progress_queue = None


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


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue


def _report(docs: int, tokens: int) -> None:
    if _progress_queue is not None:
        _progress_queue.put((docs, tokens))


def _run_tokenize(pool, queue, tasks: list[_FileTask], workers: int, progress: bool) -> None:
    if not tasks:
        return
    threads = max(1, workers // min(workers, len(tasks)))  # cores per file when files are fewer than workers
    bar = _progress_bar(progress)
    docs = tokens = 0
    t0 = time.perf_counter()
    futures: list[Future] = [pool.submit(_tokenize_file, t, threads) for t in tasks]
    pending = set(futures)
    while pending:
        _, pending = wait(pending, timeout=0.2)
        while not queue.empty():
            d, n = queue.get()
            docs, tokens = docs + d, tokens + n
            if bar is not None:
                bar.update(d)
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
    if bar is not None:
        bar.close()
    for fut in futures:
        fut.result()  # re-raise the first error (InputError names file and line)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc="tokenize", unit=" doc", dynamic_ncols=True)


def _lookup(obj: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _parse(
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
        return (
            None,
            None,
            "too_many_domains",
            f"domain {domain[:80]!r} is one more than {MAX_DOMAINS} in one file",
        )
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


def _tokenize_file(task: _FileTask, threads: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when this process first encodes
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(task.tokenizer)
    eos = np.array([tok.token_to_id(EOS_TOKEN)], dtype=np.uint16)
    tmp = task.out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    result = _FileResult()
    stats: dict[str, DomainStats] = {}
    handles = {}
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
                fh = handles[domain] = open(os.path.join(tmp, _part_name(domain)), "wb")
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
    for lineno, raw in sources.iter_lines(task.path, max_line_bytes=task.max_doc_bytes):
        domain, text, reason, detail = _parse(raw, task.domain_key, task.max_doc_bytes, slugs)
        if domain is not None:
            if domain not in stats:
                stats[domain], result.first_lines[domain] = DomainStats(slug=slugify(domain)), lineno
                slugs[stats[domain].slug] = domain
            stats[domain].docs_read += 1
        if reason is not None:
            bad = reason not in ("empty", "blank_line")
            if bad and not task.skip_bad_lines:
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
    encoder.shutdown()
    for fh in handles.values():
        fh.close()
    result.domains = {name: asdict(s) for name, s in stats.items()}
    with open(os.path.join(tmp, "done.json"), "w") as fh:
        json.dump(asdict(result), fh)
    shutil.rmtree(task.out_dir, ignore_errors=True)
    os.replace(tmp, task.out_dir)


# ---- phase 2: pack -------------------------------------------------------------------------------


def _run_pack(pool, tasks, domains, split_root, seq_len, size_limit, compression) -> dict[str, tuple[int, int]]:
    futures = {}
    for name, stats in sorted(domains.items()):
        parts = [os.path.join(t.out_dir, _part_name(name)) for t in tasks]
        parts = [p for p in parts if os.path.isfile(p)]
        out = storage.join(split_root, stats.slug)
        futures[name] = pool.submit(_pack_domain, parts, out, seq_len, size_limit, compression)
    return {name: fut.result() for name, fut in futures.items()}


def _mds_writer():
    """mosaicml-streaming's ``MDSWriter``. In a spawned conversion worker it is loaded without running the
    package's ``__init__``, which imports its datasets with torch, transformers and torchvision: 4.4 s per
    process measured here, against 1.4 s for the writer's own modules."""
    if multiprocessing.parent_process() is not None and "streaming" not in sys.modules:
        for name in ("streaming", "streaming.base", "streaming.base.format"):
            spec = importlib.util.find_spec(name)
            package = types.ModuleType(name)
            package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
            sys.modules[name] = package
    from streaming.base.format.mds.writer import MDSWriter

    return MDSWriter


def _pack_domain(parts: list[str], out: str, seq_len: int, size_limit, compression) -> tuple[int, int]:
    """Concatenate token files in order, write full samples; -> (samples, tail tokens dropped)."""
    MDSWriter = _mds_writer()  # noqa: N806

    if storage.is_s3(out):
        local = os.path.join(cache_dir("convert-upload"), hashlib.sha256(out.encode()).hexdigest()[:16])
        shutil.rmtree(local, ignore_errors=True)
        target = (local, out)
    else:
        shutil.rmtree(out, ignore_errors=True)
        target = out
    samples = 0
    carry = np.empty(0, dtype=np.uint16)
    with MDSWriter(
        out=target,
        columns={COLUMN: f"ndarray:{DTYPE}"},
        compression=compression,
        hashes=["sha1", "xxh64"],
        size_limit=size_limit,
        exist_ok=True,
        progress_bar=False,
    ) as writer:
        for part in parts:
            data = np.memmap(part, dtype=np.uint16, mode="r") if os.path.getsize(part) else np.empty(0, np.uint16)
            for start in range(0, len(data), PACK_CHUNK):
                chunk = np.concatenate([carry, data[start : start + PACK_CHUNK]])
                full = len(chunk) // seq_len * seq_len
                for row in chunk[:full].reshape(-1, seq_len):
                    writer.write({COLUMN: row})
                samples += full // seq_len
                carry = chunk[full:].copy()
            del data
    return samples, len(carry)


def _write_merged_index(split_root: str, slugs: list[str]) -> None:
    """One ``index.json`` over every domain's shards, so the whole split streams as one dataset."""
    shards = []
    for slug in slugs:
        index = untrusted.read_index(storage.join(split_root, slug))
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{slug}/{shard[key]['basename']}"
            shards.append(shard)
    storage.write_bytes(storage.join(split_root, "index.json"), json.dumps({"version": 2, "shards": shards}).encode())
