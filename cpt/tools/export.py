"""``cpt export``: a Composer checkpoint -> a Hugging Face GPT-NeoX folder with Pythia's tokenizer.

The checkpoint is local or ``s3://``: a monolithic ``ep*-ba*-rank0.pt`` file, or the folder of a sharded FSDP
checkpoint (``ep*-ba*/`` holding ``__<rank>_0.distcp`` files and ``.metadata``), which is gathered into one
state dict with torch's ``dcp_to_torch_save``.
"""

from __future__ import annotations

import os
import tempfile

from cpt.io import safe_load, storage
from cpt.run import checkpoints


def export(checkpoint: str, out: str, overwrite: bool = False) -> str:
    """Write ``out`` (local or ``s3://``) as a ``GPTNeoXForCausalLM`` folder with Pythia's tokenizer; returns it."""
    with storage.Destination(out, "cpt export OUT", overwrite) as local, tempfile.TemporaryDirectory() as tmp:
        state = load_state(checkpoint, tmp)  # OUT is checked before the work, written after it
        write_hf(state, state["model"], local, checkpoint)
    return out


def load_state(checkpoint: str, tmp: str, mmap: bool = False) -> dict:
    """A checkpoint's ``state`` (local or ``s3://``, monolithic or sharded), chosen by the checkpoint module's one
    rule (its name, its integrity, a safe pickle) and loaded safely; ``tmp`` holds downloads."""
    ck = checkpoints.fetch(checkpoint, tmp)
    local = ck.name
    if ck.sharded:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        gathered = os.path.join(tmp, f"gathered-{abs(hash(checkpoint))}.pt")
        dcp_to_torch_save(local, gathered)  # unpickles without restriction: fetch checked every pickle in it
        local = gathered
    loaded = safe_load.load(local, mmap=mmap)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state"), dict):
        raise ValueError(f"{checkpoint}: not a Composer checkpoint (no state)")
    return loaded["state"]


def write_hf(state: dict, weights: dict, out: str, where: str) -> str:
    """``weights`` (a Composer model state dict) as a GPT-NeoX folder in the local folder ``out``, with the HF
    config that ``state`` (a checkpoint's) stored and Pythia's tokenizer."""
    import torch
    from composer.models.huggingface import get_hf_config_from_composer_state_dict
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from cpt.pythia import save_tokenizer

    if "huggingface" not in state.get("integrations", {}):
        raise ValueError(f"{where}: not a checkpoint of a Hugging Face model (no integrations.huggingface)")
    # Composer's own reading of the HF config it stored; its writer is not used: it writes pickled
    # pytorch_model.bin (and reads with weights_only=False), where the export is safetensors
    config = get_hf_config_from_composer_state_dict({"state": state})
    if not isinstance(config, GPTNeoXConfig):
        raise ValueError(f"{where}: a {type(config).__name__} checkpoint, not GPT-NeoX (Pythia)")
    model = GPTNeoXForCausalLM(config)
    weights = dict(weights)
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(weights, prefix="model.")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]:
        raise ValueError(f"{where}: weights do not match GPT-NeoX (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.save_pretrained(out)
    save_tokenizer(out)
    return out
