"""Training streams with proportions (replay) -> llm-foundry's ``text`` loader config."""

from __future__ import annotations

import os

from cpt.data import manifest, verify
from cpt.io import storage, untrusted
from cpt.spec import ConfigError, Cpt


def read_manifests(paths: dict[str, str], seq_len: int, where: str) -> dict[str, manifest.Manifest]:
    """Each split's manifest, checked against the run: same sequence length, same tokenizer everywhere."""
    out = {}
    for name, path in paths.items():
        try:
            m = manifest.read(path)
        except manifest.ManifestError as exc:
            raise ConfigError(f"{where}.{name}: {exc}") from exc
        if m.seq_len != seq_len:
            raise ConfigError(f"{where}.{name}: {path} has samples of {m.seq_len} tokens but max_seq_len is {seq_len}")
        check_indices(path, m, f"{where}.{name}")
        out[name] = m
    shas = {m.tokenizer_sha256 for m in out.values()}
    if len(shas) > 1:
        raise ConfigError(f"{where}: the datasets were tokenized with different tokenizers ({sorted(shas)})")
    return out


def check_indices(split: str, m: manifest.Manifest, where: str) -> None:
    """The split's merged index and each domain's, checked before streaming reads them: streaming downloads a shard
    to whatever its basename says, so every basename must stay inside the split (``cpt.io.untrusted.index``)."""
    folders = [split] + [storage.join(split, d.slug) for d in m.domains.values() if d.samples]
    for folder in folders:
        try:
            untrusted.read_index(folder)
        except (untrusted.UntrustedError, storage.StorageError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc


def train_loader(section: Cpt, seq_len: int, cache: str) -> dict:
    total = sum(s.proportion for s in section.train.values())
    streams = {
        name: {**location(src.path, os.path.join(cache, "train", name)), "proportion": src.proportion / total}
        for name, src in section.train.items()
    }
    return {
        "name": "text",
        "dataset": {
            "streams": streams,
            "max_seq_len": seq_len,
            "shuffle": True,
            "shuffle_seed": section.shuffle_seed,
            "num_canonical_nodes": section.num_canonical_nodes,
        },
        "drop_last": True,
        **loader_workers(section.num_workers if section.num_workers is not None else default_workers()),
    }


def default_workers() -> int:
    """``cpt.num_workers`` left unset: the CPUs this process may use, shared by the ranks on this node, at most 8
    (torch warns when a loader has more workers than CPUs)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, len(os.sched_getaffinity(0)) // max(1, ranks)))


def location(path: str, cache: str) -> dict:
    """A remote split streams through a local cache, each shard checked against its hash as it arrives (a
    corrupt one stops the run with ``Checksum failure: <shard>``); a local split is read in place."""
    if path.startswith("s3://"):
        return {"remote": path, "local": cache, "validate_hash": verify.HASH}
    return {"remote": None, "local": path}


def loader_workers(n: int) -> dict:
    if n == 0:  # prefetch and persistence are errors without workers
        return {"num_workers": 0, "prefetch_factor": None, "persistent_workers": False}
    return {"num_workers": n, "prefetch_factor": 2, "persistent_workers": True}
