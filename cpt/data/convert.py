"""JSONL documents -> Pythia tokens -> packed ``seq_len`` samples -> one MDS dataset per domain, on this machine
or a Ray cluster.

1. *files*: one task per input file (``cpt.data.file_task``), run by an engine (``cpt.data.engines``: this
   machine's processes, or Ray). Each writes its file's full samples per domain and a marker holding its counts
   and tails. A rerun skips every task whose marker is there, whichever engine wrote it.
2. *finish* (here): the per-file counts are summed (a domain name that takes another's folder name is an error
   at its first line), each domain's tails are packed in input order, each domain's ``index.json`` lists its
   files' shards then its tails', and the merged ``index.json`` and, last, ``manifest.json`` are written. The
   markers are then removed.

The layout is ``file_task``'s (``file-packed``): the same bytes for any engine and any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from cpt.data import engines, file_task, sources
from cpt.data.file_task import MARKERS, MAX_DOC_BYTES, FileResult, FileTask
from cpt.data.manifest import DomainStats, Manifest, slugify
from cpt.data.manifest import write as write_manifest
from cpt.data.tokenizer import describe as describe_tokenizer
from cpt.io import storage, untrusted

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DOMAIN_KEYS = {"pile": "meta.pile_set_name", "slimpajama": "meta.redpajama_set_name"}
TAILS = "tails"  # <split>/<domain>/tails/: each domain's file tails, packed in input order


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
    progress: bool = True,
    max_doc_bytes: int = MAX_DOC_BYTES,
    engine: str = "local",
    ray_address: str = "",
) -> ConvertResult:
    """Convert JSONL files into ``<output>/<split>/<domain-slug>/`` MDS datasets plus a merged index.

    ``domain_key`` is a dotted path into each JSON object, e.g. ``meta.pile_set_name``. ``engine`` is ``local``
    (``workers`` processes) or ``ray`` (the cluster at ``ray_address``). Raises ``InputError`` (file and line) on
    bad input unless ``skip_bad_lines``.
    """
    start = time.perf_counter()
    workers = _check(split, seq_len, domain_key, workers, max_doc_bytes, engine)
    info = describe_tokenizer(tokenizer)
    files = storage.match_inputs(inputs)
    for path in files:
        sources.check_suffix(path)
    split_root = storage.join(output, split)
    storage.check_writable(split_root)
    sizes = [storage.size(p) for p in files]
    with open(info.path) as fh:
        text = fh.read()
    settings = json.dumps([info.sha256, domain_key, skip_bad_lines, seq_len, max_doc_bytes, size_limit, compression])
    tasks = []
    for i, (path, nbytes) in enumerate(zip(files, sizes)):
        key = hashlib.sha256(f"{path}\0{nbytes}\0{settings}".encode()).hexdigest()[:16]
        tasks.append(
            FileTask(
                i, path, key, split_root, text, domain_key, skip_bad_lines, seq_len, size_limit, compression,
                max_doc_bytes, threads=max(1, workers // max(1, min(workers, len(files)))),
            )
        )  # fmt: skip
    finished = set(storage.list_prefix(storage.join(split_root, MARKERS)))
    results = {t.index: file_task.read_marker(t) for t in tasks if t.marker.rsplit("/", 1)[1] in finished}
    todo = [t for t in tasks if t.index not in results]
    log.info("converting %d files (%d already done) with the %s engine", len(files), len(results), engine)
    bar = engines.Progress(progress, len(tasks), len(results))
    try:
        run = engines.run_ray(todo, ray_address, bar) if engine == "ray" else engines.run_local(todo, workers, bar)
        for task, result in run:
            results[task.index] = result
    finally:
        bar.close()
    domains, unattributed = _gather(tasks, results, skip_bad_lines)
    for name, stats in domains.items():
        packed = _finish_domain(tasks, results, name, seq_len, size_limit, compression)
        stats.samples, stats.tail_tokens_dropped = packed
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
    storage.delete_folder(storage.join(split_root, MARKERS))  # the split is complete: its markers are not needed
    return ConvertResult(split_root, manifest, len(todo), len(tasks) - len(todo), time.perf_counter() - start)


def _check(split: str, seq_len: int, domain_key: str, workers: int | None, max_doc_bytes: int, engine: str) -> int:
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
    if engine not in engines.ENGINES:
        raise ValueError(f"engine must be one of {engines.ENGINES}, got {engine!r}")
    return workers


def _gather(
    tasks: list[FileTask], results: dict[int, FileResult], skip_bad_lines: bool
) -> tuple[dict[str, DomainStats], dict[str, int]]:
    """Sum the per-file counts into per-domain stats. Two names that share a folder name (each file checks its
    own lines as it reads them; this is across files): the one that appears later is an error at its first
    line, or, with ``skip_bad_lines``, its lines are counted as skipped (``domain_collision``) and its files'
    samples removed."""
    domains: dict[str, DomainStats] = {}
    unattributed: dict[str, int] = {}
    first: dict[str, tuple[int, int, str]] = {}  # name -> (file index, line, path)
    for task in tasks:
        res = results[task.index]
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
        for task in tasks:  # its files' samples sit in the other name's folder (a file never holds both): removed
            if results[task.index].domains.pop(name, None) is not None:
                storage.delete_folder(storage.join(task.split_root, slug, task.part))
            results[task.index].tails.pop(name, None)
    return domains, unattributed


# ---- finish --------------------------------------------------------------------------------------------------


def _finish_domain(tasks, results, name, seq_len, size_limit, compression) -> tuple[int, int]:
    """Pack the domain's tails in input order, then write its ``index.json``: its files' shards in input order,
    then the tails'. Returns (samples, tokens of the last partial sample, dropped)."""
    slug = slugify(name)
    root = tasks[0].split_root
    tails = [file_task.tail_tokens(results[t.index], name) for t in tasks if name in results[t.index].domains]
    total = sum(len(t) for t in tails)
    parts = [t.part for t in tasks if results[t.index].domains.get(name, {}).get("samples")]
    samples = sum(results[t.index].domains[name]["samples"] for t in tasks if name in results[t.index].domains)
    if total >= seq_len:
        packed, rest = file_task.write_samples(
            storage.join(root, slug, TAILS), iter(tails), seq_len, size_limit, compression
        )
        samples, dropped = samples + packed, len(rest)
        parts.append(TAILS)
    else:
        dropped = total
    shards = []
    for part in parts:
        for shard in untrusted.read_index(storage.join(root, slug, part))["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part}/{shard[key]['basename']}"
            shards.append(shard)
    storage.write_bytes(storage.join(root, slug, "index.json"), json.dumps({"version": 2, "shards": shards}).encode())
    return samples, dropped


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
