"""Locating and loading the Pythia (GPT-NeoX) tokenizer from a file or a Hugging Face folder."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cpt.io import storage
from cpt.io.cache import mirror_file

EOS_TOKEN = "<|endoftext|>"
UINT16_LIMIT = 1 << 16


@dataclass(frozen=True)
class TokenizerInfo:
    path: str  # local tokenizer.json
    sha256: str
    vocab_size: int
    eos_id: int


def resolve(spec: str) -> str:
    """``tokenizer.json`` file or HF folder, local or ``s3://`` -> a local ``tokenizer.json`` path."""
    url = spec if spec.endswith(".json") else storage.join(spec, "tokenizer.json")
    if not storage.is_s3(url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f"tokenizer not found: {url} (give a tokenizer.json or a folder holding one)")
        return url
    return mirror_file(url, "tokenizers")  # fetched again whenever its ETag changes, as model folders are


def load(spec: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(resolve(spec))


def describe(spec: str) -> TokenizerInfo:
    path = resolve(spec)
    tok = load(path)
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"{path}: tokenizer has no {EOS_TOKEN} token; is this the Pythia/GPT-NeoX tokenizer?")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > UINT16_LIMIT:
        raise ValueError(f"{path}: vocabulary of {vocab} tokens does not fit uint16 storage")
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return TokenizerInfo(path=path, sha256=sha, vocab_size=vocab, eos_id=eos)
