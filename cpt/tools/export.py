"""``cpt export``: a Composer checkpoint -> a Hugging Face GPT-NeoX folder with Pythia's tokenizer.

The checkpoint is local or ``s3://``: a monolithic ``ep*-ba*-rank0.pt`` file, or the folder of a sharded FSDP
checkpoint (``ep*-ba*/`` holding ``__<rank>_0.distcp`` files and ``.metadata``), which is gathered into one
state dict with torch's ``dcp_to_torch_save``.
"""

from __future__ import annotations

import os
import tempfile

from cpt.io import safe_load, storage


def export(checkpoint: str, out: str) -> str:
    """Write ``out`` (local or ``s3://``) as a ``GPTNeoXForCausalLM`` folder with Pythia's tokenizer; returns it."""
    storage.check_not_mistyped_url(out, "cpt export OUT")  # before the work, not after
    with tempfile.TemporaryDirectory() as tmp:
        state = load_state(checkpoint, tmp)
        return write_hf(state, state["model"], out, checkpoint)


def load_state(checkpoint: str, tmp: str, mmap: bool = False) -> dict:
    """A checkpoint's ``state`` (local or ``s3://``, monolithic or sharded), loaded safely; ``tmp`` holds downloads."""
    local = _fetch(checkpoint, tmp)
    if os.path.isdir(local):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        if not os.path.isfile(os.path.join(local, ".metadata")):
            raise FileNotFoundError(f"{checkpoint}: a folder, but not a sharded checkpoint (no .metadata)")
        safe_load.check(local)  # dcp_to_torch_save unpickles without restriction: only what passes
        gathered = os.path.join(tmp, f"gathered-{abs(hash(checkpoint))}.pt")
        dcp_to_torch_save(local, gathered)
        local = gathered
    return safe_load.load(local, mmap=mmap)["state"]


def write_hf(state: dict, weights: dict, out: str, where: str) -> str:
    """``weights`` (a Composer model state dict) as a GPT-NeoX folder at ``out``, with the HF config that
    ``state`` (a checkpoint's) stored and Pythia's tokenizer."""
    import torch
    from composer.models.huggingface import get_hf_config_from_composer_state_dict
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from cpt.model import save_tokenizer

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
    with storage.Destination(out, "OUT") as local:
        model.save_pretrained(local)
        save_tokenizer(local)
    return out


def _fetch(checkpoint: str, tmp: str) -> str:
    """A local path to the checkpoint file or sharded folder, downloading from ``s3://`` into ``tmp``."""
    if not storage.is_s3(checkpoint):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        return checkpoint
    if checkpoint.endswith(".pt"):
        local = os.path.join(tmp, "checkpoint.pt")
        storage.download_file(checkpoint, local)
        return local
    keys = storage.list_prefix(checkpoint)
    if not keys:
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} holds no objects")
    folder = os.path.join(tmp, "sharded")
    targets = {key: storage.local_path(folder, key, checkpoint) for key in keys}  # all checked, then fetched
    for key in keys:
        storage.download_file(storage.join(checkpoint, key), targets[key])
    return folder
