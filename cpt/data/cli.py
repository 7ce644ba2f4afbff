"""The command line shared by ``convert/pile.py``, ``convert/slimpajama.py`` and ``cpt convert``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cpt.data import sources
from cpt.data.convert import DOMAIN_KEYS, SPLITS, convert
from cpt.data.engines import ENGINES
from cpt.data.file_task import MAX_DOC_BYTES
from cpt.io import storage


def add_arguments(parser: argparse.ArgumentParser, corpus: str | None) -> None:
    if corpus is None:
        parser.add_argument(
            "--corpus",
            choices=sorted(DOMAIN_KEYS),
            required=True,
            help="which corpus: sets the JSON key the domain is read from",
        )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="input files, local paths or s3:// URLs, globs allowed (quote them): .jsonl, .jsonl.zst or .jsonl.gz",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="local folder or s3:// prefix; writes <output>/<split>/<domain>/, index.json, manifest.json",
    )
    parser.add_argument("--split", choices=SPLITS, required=True, help="which split these inputs are")
    parser.add_argument(
        "--tokenizer", required=True, help="a tokenizer.json file or a Hugging Face folder holding one, local or s3://"
    )
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (default: 2048)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count(),
        help=f"processes and tokenizer threads to use (default: all cores, {os.cpu_count()})",
    )
    parser.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="count bad lines by reason in the manifest instead of stopping at the first",
    )
    parser.add_argument(
        "--max-doc-bytes",
        type=int,
        default=MAX_DOC_BYTES,
        help=f"a longer JSON line is skipped as too_large, or stops the run (default: {MAX_DOC_BYTES:,}); keeps a "
        "worker's memory bounded",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="who converts the files: this machine's processes (local, the default) or a Ray cluster (ray: one task "
        "per input file, S3 to S3; pip install '.[ray]')",
    )
    parser.add_argument(
        "--ray-address",
        default="",
        help="with --engine ray: 'auto' (the cluster this node belongs to), 'ray://host:port', or empty for a Ray "
        "started here (default)",
    )
    parser.add_argument("--shard-size", default="64mb", help="MDS shard size limit (default: 64mb)")
    parser.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")


def run(args: argparse.Namespace, corpus: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert(
            inputs=args.input,
            output=args.output,
            split=args.split,
            tokenizer=args.tokenizer,
            domain_key=DOMAIN_KEYS[corpus],
            seq_len=args.seq_len,
            workers=args.workers,
            skip_bad_lines=args.skip_bad_lines,
            size_limit=args.shard_size,
            compression=args.compression,
            progress=not args.no_progress,
            max_doc_bytes=args.max_doc_bytes,
            engine=args.engine,
            ray_address=args.ray_address,
        )
    except (sources.InputError, storage.StorageError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.manifest
    print(
        f"wrote {result.split_root}: {len(m.domains)} domains, {result.samples:,} samples of {m.seq_len} tokens, "
        f"{result.tokens:,} tokens in {result.seconds:.1f}s ({result.tokens / max(result.seconds, 1e-9):,.0f} tok/s); "
        f"{result.files_reused} of {result.files_converted + result.files_reused} files reused from a previous run "
        f"({args.engine} engine)"
    )
    for _name, d in sorted(m.domains.items()):
        skipped = sum(d.docs_skipped.values())
        print(
            f"  {d.slug:<32} docs {d.docs_written:>9,}/{d.docs_read:<9,} skipped {skipped:<6,} samples {d.samples:>9,}"
        )
    if m.unattributed_skipped:
        print(f"  lines skipped without a domain: {m.unattributed_skipped}")
    return 0


def main(corpus: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"convert/{corpus}.py",
        description=f"Convert {corpus} JSONL into per-domain MDS datasets (domain from {DOMAIN_KEYS[corpus]}).",
    )
    add_arguments(parser, corpus)
    return run(parser.parse_args(argv), corpus)
