"""``cpt export``: a Composer checkpoint (local or ``s3://``, monolithic) -> a Hugging Face GPT-NeoX folder."""

from __future__ import annotations

import os
import tempfile

from cpt import storage


def export(checkpoint: str, out: str) -> str:
    """Write ``out`` as a ``GPTNeoXForCausalLM`` folder with Pythia's tokenizer; returns ``out``."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from cpt.model import save_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        local = checkpoint
        if storage.is_s3(checkpoint):
            local = os.path.join(tmp, "checkpoint.pt")
            storage.download_file(checkpoint, local)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        state = torch.load(local, map_location="cpu", weights_only=False)["state"]
    try:
        hf_config = state["integrations"]["huggingface"]["model"]["config"]["content"]
    except KeyError as exc:
        raise ValueError(
            f"{checkpoint}: not a checkpoint of a Hugging Face model (no integrations.huggingface)"
        ) from exc
    config = GPTNeoXConfig.from_dict({k: v for k, v in hf_config.items() if not k.startswith("_")})
    model = GPTNeoXForCausalLM(config)
    weights = {k.removeprefix("model."): v for k, v in state["model"].items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]:
        raise ValueError(
            f"{checkpoint}: weights do not match GPT-NeoX (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.save_pretrained(out)
    save_tokenizer(out)
    return out
