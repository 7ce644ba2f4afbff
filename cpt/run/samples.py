"""An audit trail of the samples trained: one line per batch with a digest of each sample's tokens.

``cpt.log_samples: true`` writes ``<run_dir>/<run>/samples-rank<r>.jsonl``. A resumed run appends to the
same file and re-trains the batches after its checkpoint, so readers keep the last line per batch
(``read``): the result is the sequence of samples that reached the final weights.
"""

from __future__ import annotations

import hashlib
import json
import os

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def digest(tokens) -> str:
    return hashlib.blake2b(tokens.detach().cpu().numpy().tobytes(), digest_size=8).hexdigest()


class SampleLog(Callback):
    KEY = "cpt_sample_log"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, folder: str):
        self.folder = folder
        self._pending: tuple[int, list[str]] | None = None

    def path(self) -> str:
        return os.path.join(self.folder, f"samples-rank{dist.get_global_rank()}.jsonl")

    def after_dataloader(self, state: State, logger: Logger) -> None:
        ids = state.batch["input_ids"] if isinstance(state.batch, dict) else state.batch[0]
        self._pending = (int(state.timestamp.batch), [digest(row) for row in ids])

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._pending is None:
            return
        batch, samples = self._pending
        os.makedirs(self.folder, exist_ok=True)
        with open(self.path(), "a") as fh:
            fh.write(json.dumps({"batch": batch, "samples": samples}) + "\n")
        self._pending = None


def read(path: str) -> tuple[list[list[str]], list[tuple[int, list[str], list[str]]]]:
    """``(per_batch, replays)``: the samples of each batch (last line wins), and every re-trained batch as
    ``(batch, first, last)`` so a caller can check that a replay trained the same samples."""
    last: dict[int, list[str]] = {}
    replays = []
    with open(path) as fh:
        for line in fh:
            row = json.loads(line)
            if row["batch"] in last:
                replays.append((row["batch"], last[row["batch"]], row["samples"]))
            last[row["batch"]] = row["samples"]
    return [last[b] for b in sorted(last)], replays
