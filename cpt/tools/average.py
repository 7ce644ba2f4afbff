"""``cpt average``: checkpoints of a save folder averaged into one Hugging Face folder (in place of a decay).

Uniform (``--last K`` or ``--from B --to B``) or exponential (``--ema DECAY``, oldest first:
``avg = DECAY * avg + (1 - DECAY) * w``). One checkpoint is read at a time (memory-mapped, and deleted from the
cache once added), so memory stays near one model in float32 plus the checkpoint being read, not K models.
Monolithic and sharded checkpoints, local or ``s3://``; the output is local or ``s3://``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile

from cpt.io import storage, untrusted
from cpt.run import checkpoints
from cpt.tools.export import load_state, write_hf

log = logging.getLogger(__name__)


def select(save_folder: str, last: int | None, start: int | None, end: int | None) -> list[checkpoints.Checkpoint]:
    """The checkpoints to average, oldest first: the newest ``last``, or those with ``start <= batch <= end``."""
    found = sorted(checkpoints.listing(save_folder), key=lambda c: c.batch)
    if last is not None:
        if last < 1:
            raise ValueError(f"--last {last}: average at least one checkpoint")
        chosen = found[-last:]
    else:
        lo, hi = start if start is not None else 0, end if end is not None else float("inf")
        chosen = [c for c in found if lo <= c.batch <= hi]
    if not chosen:
        raise ValueError(f"{save_folder}: no checkpoint to average (found batches {[c.batch for c in found]})")
    return chosen


def average(
    save_folder: str,
    out: str,
    last: int | None = None,
    start: int | None = None,
    end: int | None = None,
    ema: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[int]:
    """Average the chosen checkpoints' model weights into ``out``; returns the batches averaged.

    Checkpoints are chosen by the checkpoint module's one rule (``checkpoints.fetch``): a broken one (truncated,
    incomplete, unsafe) is skipped with a warning, as resume skips it. Weights of another shape are refused."""
    import torch
    from tqdm import tqdm

    if ema is not None and not 0.0 <= ema < 1.0:
        raise ValueError(f"--ema {ema}: the decay must be in [0, 1)")
    if untrusted.inside(out, save_folder) or untrusted.inside(save_folder, out):
        raise ValueError(f"cpt average OUT {out}: the save folder {save_folder} would hold it, or be in it")
    chosen = select(save_folder, last, start, end)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    state, used = None, []
    with storage.Destination(out, "cpt average OUT", overwrite) as local:
        for ck in tqdm(chosen, desc="average", unit="checkpoint", disable=not progress):
            tmp = tempfile.mkdtemp(prefix="cpt-average-")
            url = storage.join(save_folder, ck.name)
            try:
                try:
                    loaded = load_state(url, tmp, mmap=True)
                except (ValueError, OSError, storage.StorageError) as exc:
                    log.warning("skipping %s: %s", url, exc)
                    continue
                weights = loaded.get("model")
                if not isinstance(weights, dict) or (total and set(weights) != set(total)):
                    raise ValueError(f"{url}: its weights are not those of the checkpoints before it")
                for key, value in weights.items():
                    if not isinstance(value, torch.Tensor) or (key in total and value.shape != total[key].shape):
                        raise ValueError(f"{url}: {key} has another shape than in the checkpoints before it")
                    w = value.detach().to(torch.float32)
                    dtypes[key] = value.dtype
                    if not used:
                        total[key] = w.clone()
                    elif ema is None:
                        total[key] += w
                    else:
                        total[key].mul_(ema).add_(w, alpha=1.0 - ema)
                used.append(ck.batch)
                state = {"integrations": loaded.get("integrations", {})}  # the rest is not needed: let it go
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if not used:
            raise ValueError(f"{save_folder}: none of the chosen checkpoints {[c.batch for c in chosen]} is intact")
        scale = 1.0 / len(used) if ema is None else 1.0
        weights = {k: (v * scale).to(dtypes[k]) for k, v in total.items()}
        how = f"EMA {ema}" if ema is not None else "uniform"
        log.info("averaged %d checkpoints (%s): batches %s", len(used), how, used)
        write_hf(state, weights, local, save_folder)
    return used
