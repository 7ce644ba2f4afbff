"""Check a converted split's shards against the hashes written at conversion (local or ``s3://``)."""

from __future__ import annotations

from cpt.io import storage, untrusted

HASH = "xxh64"  # written by the converter next to sha1; training validates downloads with it too


def verify(split_root: str, progress: bool = True) -> tuple[int, list[str]]:
    """``(shards checked, paths of shards whose bytes do not match their recorded hash)``."""
    from streaming.base.hashing import get_hash
    from tqdm import tqdm

    index = untrusted.read_index(split_root)  # every basename a key inside the split, before anything is read
    bad = []
    for shard in tqdm(index["shards"], desc="verify", unit="shard", disable=not progress):
        info = shard.get("zip_data") or shard["raw_data"]
        path = storage.join(split_root, info["basename"])
        if get_hash(HASH, storage.read_bytes(path)) != info["hashes"][HASH]:
            bad.append(path)
    return len(index["shards"]), bad
