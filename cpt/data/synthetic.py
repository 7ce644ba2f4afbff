"""Seeded synthetic corpora with clearly different statistics, for the quickstart and tests.

No third-party text ships in the package: documents are generated from small word lists.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_VOCAB = {
    "prose": (
        "the river city morning winter garden story old light house road children market "
        "quiet evening letter mother window music village summer forest train friend"
    ).split(),
    "code": (
        "def return self value index list dict None True False import class for while if "
        "else print len range key item result data node parse yield"
    ).split(),
    "science": (
        "protein cell energy mass quantum field model sample theory equation measure "
        "neuron signal gene spectrum particle density reaction catalyst vector"
    ).split(),
}
_PUNCT = {"prose": ". ", "code": ";\n", "science": ". "}


BURST = 0.9  # "-bursty": the chance that a word repeats an earlier word of its document


def document(rng: random.Random, style: str, words: int) -> str:
    """A document in ``style``. ``"<style>-shifted"``: the same words with the word frequencies reversed.
    ``"<style>-bursty"``: the same words at the same overall frequencies, but each word repeats an earlier word of
    the document with probability ``BURST`` (a Polya urn): what is new is in-context repetition, slow to learn."""
    base, _, variant = style.partition("-")
    vocab, stop = _VOCAB[base], _PUNCT[base]
    # a skewed (Zipf-like) choice makes the text learnable by a tiny model
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    if variant == "shifted":
        weights.reverse()
    elif variant not in ("", "bursty"):
        raise ValueError(f"unknown style {style!r}: expected one of {sorted(_VOCAB)}, optionally -shifted or -bursty")
    drawn = rng.choices(vocab, weights=weights, k=words)
    if variant == "bursty":
        for i in range(1, words):
            if rng.random() < BURST:
                drawn[i] = drawn[rng.randrange(i)]
    out, sentence = [], []
    for word in drawn:
        sentence.append(word)
        if len(sentence) >= rng.randint(5, 12):
            out.append(" ".join(sentence) + stop)
            sentence = []
    if sentence:
        out.append(" ".join(sentence) + stop)
    return "".join(out).strip()


def write_jsonl(
    path: str | Path, domains: dict[str, str], docs: int, seed: int, domain_key: str, words: tuple[int, int] = (50, 400)
) -> list[dict]:
    """Write ``docs`` documents cycling over ``domains`` ({name: style}); returns the records written."""
    rng = random.Random(seed)
    outer, inner = domain_key.split(".", 1) if "." in domain_key else (None, domain_key)
    names = list(domains)
    records = []
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(docs):
            name = names[i % len(names)]
            meta = {inner: name}
            record = {"text": document(rng, domains[name], rng.randint(*words)), **({outer: meta} if outer else meta)}
            fh.write(json.dumps(record) + "\n")
            records.append(record)
    return records


TOKENIZER = str(Path(__file__).resolve().parents[1] / "assets" / "tokenizer.json")


def tiny_project(
    tmp: Path, domains: dict[str, dict[str, str]], docs: dict[str, int], seq_len: int = 64, model_seq_len: int = 256
) -> Path:
    """``tmp/data/<name>/<split>/`` MDS splits of generated text (``{name: {domain: style}}``, Pile's key) and
    ``tmp/model``, a tiny Pythia folder: the shape ``yamls/tiny-cpu.yaml`` expects."""
    from cpt.data.convert import DOMAIN_KEYS, convert
    from cpt.pythia import save_tiny_pythia

    key = DOMAIN_KEYS["pile"]
    tmp.mkdir(parents=True, exist_ok=True)
    for name, styles in domains.items():
        for split, n in docs.items():
            src = tmp / f"{name}-{split}.jsonl"
            write_jsonl(src, styles, docs=n, seed=len(split), domain_key=key)
            convert(
                [str(src)],
                str(tmp / "data" / name),
                split,
                TOKENIZER,
                key,
                seq_len=seq_len,
                workers=1,
                progress=False,
            )
    save_tiny_pythia(str(tmp / "model"), seq_len=model_seq_len)
    return tmp


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()") for w in text.split()]


def _passages(rng: random.Random, texts: list[str], tries: int, context: int):
    """``(document words, a stretch of ``context`` words, the word after it)`` drawn from random documents."""
    for _ in range(tries):
        words = _words(rng.choice(texts))
        if len(words) > context:
            start = rng.randrange(len(words) - context)
            yield words, words[start : start + context], words[start + context]


def next_word_choice(texts: list[str], n: int, seed: int, choices: int = 4, context: int = 24) -> list[dict]:
    """A ``multiple_choice`` task (``query``, ``choices``, ``gold``) from documents: which word comes next? The
    query is a stretch of ``context`` words, the gold choice the word that follows it, the others words of the same
    document that the query does not hold (the same vocabulary: the document's topic does not give it away)."""
    rng = random.Random(seed)
    rows = []
    for words, query, answer in _passages(rng, texts, 100 * n, context):
        wrong = sorted({w for w in words if w.isalpha() and w not in query and w != answer})
        if not answer.isalpha() or len(wrong) < choices - 1:
            continue
        options = rng.sample(wrong, choices - 1)
        gold = rng.randrange(choices)
        options.insert(gold, answer)
        rows.append({"query": " ".join(query), "choices": options, "gold": gold})
        if len(rows) == n:
            break
    return rows


def last_word(texts: list[str], n: int, seed: int, context: int = 24) -> list[dict]:
    """A ``language_modeling`` task (``context``, ``continuation``), LAMBADA's shape: a stretch of words and the
    word that follows it (with its leading space)."""
    rng = random.Random(seed)
    rows = []
    for _, query, answer in _passages(rng, texts, 100 * n, context):
        if answer.isalpha():
            rows.append({"context": " ".join(query), "continuation": " " + answer})
            if len(rows) == n:
                break
    return rows


def write_task(path: str | Path, rows: list[dict]) -> str:
    """One JSON object per line: the format ``cpt.eval.tasks`` and ``cpt eval`` read."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)
