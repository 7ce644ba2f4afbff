"""The Pythia family: its architectures by name (70M to 12B, the public ``config.json`` values), tiny test
models of the same shape, and Pythia step folders written without the hub.

``cpt.model: pythia:410m`` (with ``cpt.from_scratch: true``) names the 410M architecture with Pythia's tokenizer
and no weights: a folder of ``config.json`` and the tokenizer files written into the cache. The same folders
serve ``cpt eval`` and tests (``write_folder(name, out, weights=True)`` adds random weights).
"""

from __future__ import annotations

import json
import os

# EleutherAI/pythia-*'s config.json: hidden size, layers, attention heads (intermediate is 4 x hidden)
ARCHITECTURES = {
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
    "1b": (2048, 16, 8),
    "1.4b": (2048, 24, 16),
    "2.8b": (2560, 32, 32),
    "6.9b": (4096, 32, 32),
    "12b": (5120, 36, 40),
}
PREFIX = "pythia:"


def config(name: str) -> dict:
    """The ``config.json`` of ``pythia-<name>`` (``70m`` ... ``12b``); ``ValueError`` naming the known ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"cpt.model: pythia:{name} is not a Pythia size (one of {', '.join(ARCHITECTURES)})")
    hidden, layers, heads = ARCHITECTURES[name]
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": 50304,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "hidden_act": "gelu",
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "use_parallel_residual": True,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float16",
    }


def write_folder(name: str, out: str, weights: bool = False, seed: int = 0) -> str:
    """A Pythia step folder of the architecture ``name``: ``config.json`` and the tokenizer; with ``weights``, a
    random initialisation too (``model.safetensors``)."""
    os.makedirs(out, exist_ok=True)
    if weights:
        import torch
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        torch.manual_seed(seed)
        GPTNeoXForCausalLM(GPTNeoXConfig(**config(name))).save_pretrained(out)
    else:
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump(config(name), fh, indent=2)
    save_tokenizer(out)
    return out


def folder(spec: str) -> str:
    """The cache's folder for ``pythia:<name>`` (config and tokenizer, no weights), written once."""
    from cpt.io.cache import cache_dir, locked

    name = spec[len(PREFIX) :]
    config(name)  # a known size, or a clear error
    home = cache_dir("pythia", name)
    with locked(home):
        if not os.path.isfile(os.path.join(home, "files", "tokenizer.json")):
            write_folder(name, os.path.join(home, "files"))
    return os.path.join(home, "files")


def tiny_config(seq_len: int = 256, layers: int = 2, hidden: int = 64):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=seq_len,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def save_tokenizer(folder: str) -> None:
    """Pythia's tokenizer files, as a Pythia step folder has them (no pad token: set at load time)."""
    from transformers import GPTNeoXTokenizerFast

    tok = GPTNeoXTokenizerFast(
        tokenizer_file=os.path.join(os.path.dirname(__file__), "assets", "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.save_pretrained(folder)


def save_tiny_pythia(folder: str, seed: int = 0, seq_len: int = 256, layers: int = 2, hidden: int = 64) -> str:
    """A tiny GPT-NeoX with Pythia's vocabulary, saved as a Pythia step folder (weights + tokenizer)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    GPTNeoXForCausalLM(tiny_config(seq_len, layers, hidden)).save_pretrained(folder)
    save_tokenizer(folder)
    return folder
