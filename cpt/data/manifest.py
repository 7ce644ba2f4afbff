"""The manifest of one converted split: schema, read, write, validate and fingerprint.

``<root>/<split>/manifest.json`` is written last, so its presence marks a complete split.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

from cpt.io import storage, untrusted

FORMAT_VERSION = 1
LAYOUT = "file-packed"  # cpt.data.file_task: each file's samples, then each domain's tails packed in input order
OLD_LAYOUT = "concatenated"  # before: each domain's files concatenated, then packed (a manifest without "layout")
COLUMN = "tokens"
DTYPE = "uint16"


class ManifestError(ValueError):
    """A manifest is missing or malformed; the message names its path and key."""


SLUG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")  # what slugify makes; nothing else names a domain's folder


def slugify(name: str) -> str:
    """``"Pile-CC"`` -> ``"pile-cc"``, ``"Gutenberg (PG-19)"`` -> ``"gutenberg-pg-19"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"domain name {name!r} has no letters or digits to name a folder with")
    return slug


@dataclass
class DomainStats:
    slug: str
    docs_read: int = 0
    docs_written: int = 0
    docs_skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    samples: int = 0
    tail_tokens_dropped: int = 0

    def skip(self, reason: str, n: int = 1) -> None:
        self.docs_skipped[reason] = self.docs_skipped.get(reason, 0) + n

    def merge(self, other: DomainStats) -> None:
        self.docs_read += other.docs_read
        self.docs_written += other.docs_written
        self.tokens += other.tokens
        for reason, n in other.docs_skipped.items():
            self.skip(reason, n)


@dataclass
class Manifest:
    split: str
    seq_len: int
    eos_id: int
    domain_key: str
    tokenizer_sha256: str
    vocab_size: int
    domains: dict[str, DomainStats]
    unattributed_skipped: dict[str, int]
    inputs: list[dict]
    format_version: int = FORMAT_VERSION
    layout: str = LAYOUT
    column: str = COLUMN
    dtype: str = DTYPE

    def content(self) -> dict:
        """The fields that define the data (not where it came from): what the fingerprint hashes. The layout
        decides where samples begin, so it is hashed too (absent for the old one, whose fingerprints stay)."""
        layout = {} if self.layout == OLD_LAYOUT else {"layout": self.layout}
        return {
            **layout,
            "format_version": self.format_version,
            "column": self.column,
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "eos_id": self.eos_id,
            "domain_key": self.domain_key,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "domains": {k: asdict(v) for k, v in sorted(self.domains.items())},
        }

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.content(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_json(self) -> str:
        body = {
            **self.content(),
            "split": self.split,
            "unattributed_skipped": self.unattributed_skipped,
            "inputs": self.inputs,
            "fingerprint": self.fingerprint,
        }
        return json.dumps(body, indent=2, sort_keys=True) + "\n"


def manifest_path(split_root: str) -> str:
    return storage.join(split_root, "manifest.json")


def write(split_root: str, manifest: Manifest) -> None:
    storage.write_bytes(manifest_path(split_root), manifest.to_json().encode())


_REQUIRED = ("format_version", "seq_len", "eos_id", "domain_key", "tokenizer_sha256", "vocab_size", "domains")


def read(split_root: str) -> Manifest:
    """Read and validate ``<split_root>/manifest.json``; errors name the path and the key."""
    path = manifest_path(split_root)
    try:
        raw = untrusted.record(path, "the manifest")
    except storage.StorageError as exc:
        raise ManifestError(f"missing manifest {path}: was this split written by cpt's convert? ({exc})") from exc
    except untrusted.UntrustedError as exc:
        raise ManifestError(str(exc)) from exc
    for key in _REQUIRED:
        if key not in raw:
            raise ManifestError(f"{path}: missing key {key!r}")
    for key, kind in (("seq_len", int), ("eos_id", int), ("vocab_size", int), ("domains", dict)):
        try:
            untrusted.field(raw, key, kind, path)
        except untrusted.UntrustedError as exc:
            raise ManifestError(str(exc)) from exc
    if raw["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {raw['format_version']} is not {FORMAT_VERSION}")
    domains = {}
    for name, stats in raw["domains"].items():
        try:
            if not isinstance(stats, dict):
                raise TypeError(f"expected an object, got {type(stats).__name__}")
            domains[name] = DomainStats(**stats)
        except TypeError as exc:
            raise ManifestError(f"{path}: domains.{name}: {exc}") from exc
        slug = domains[name].slug
        if not isinstance(slug, str) or not SLUG.fullmatch(slug):  # it becomes a folder name in local caches
            raise ManifestError(f"{path}: domains.{name}.slug {slug!r} is not a slug (lower-case letters, digits, -)")
    manifest = Manifest(
        split=raw.get("split", ""),
        seq_len=raw["seq_len"],
        eos_id=raw["eos_id"],
        domain_key=raw["domain_key"],
        tokenizer_sha256=raw["tokenizer_sha256"],
        vocab_size=raw["vocab_size"],
        domains=domains,
        unattributed_skipped=raw.get("unattributed_skipped", {}),
        inputs=raw.get("inputs", []),
        layout=raw.get("layout", OLD_LAYOUT),
    )
    if "fingerprint" in raw and raw["fingerprint"] != manifest.fingerprint:
        raise ManifestError(f"{path}: fingerprint does not match its content (edited by hand?)")
    return manifest
