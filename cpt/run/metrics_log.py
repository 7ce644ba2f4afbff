"""``metrics.jsonl``: one JSON object per log call, with ``batch`` and ``tokens``, for offline reports.

Rank 0 appends to ``<run_dir>/metrics.jsonl`` (a resumed run keeps adding to the same file; readers keep
the last value per batch). With ``remote`` set (the run's ``s3://`` save folder), the file is uploaded
after every evaluation (on a thread, so an S3 outage does not stall training) and at the end of the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path

import yaml
from composer.core import Callback, Event, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from cpt.io import storage, untrusted
from cpt.run import threads

log = logging.getLogger(__name__)


class MetricsJSONL(LoggerDestination):
    KEY = "cpt_jsonl"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, path: str, remote: str | None = None):
        self.path, self.remote = path, remote
        self._state: State | None = None
        self._upload: threading.Thread | None = None

    def init(self, state: State, logger: Logger) -> None:
        self._state = state
        if dist.get_global_rank() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.continue_history()

    def continue_history(self) -> None:
        """A resume on a node without the local file (another machine) continues the bucket's history instead of
        replacing it: the uploaded ``metrics.jsonl`` is fetched first, its rows checked (``untrusted.jsonl``)."""
        if not self.remote or os.path.isfile(self.path):
            return
        url = storage.join(self.remote, "metrics.jsonl")
        if not storage.exists(url):
            return
        rows = [json.dumps(row) for _, row in untrusted.jsonl(url, "metrics.jsonl", tolerate_last=True)]
        with open(self.path, "w") as fh:
            fh.write("".join(r + "\n" for r in rows))
        log.info("continuing the history of %s (%d rows)", url, len(rows))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if dist.get_global_rank() != 0 or self._state is None:
            return
        ts = self._state.timestamp
        row = {"batch": int(ts.batch), "tokens": int(ts.token)}
        for key, value in metrics.items():
            value = float(value.item() if hasattr(value, "item") else value)
            row[key] = value if math.isfinite(value) else None
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        super().run_event(event, state, logger)
        if event == Event.FIT_START and int(state.timestamp.batch) == 0:
            logger.log_metrics(first_lrs(state))  # lr_monitor logs after each batch: never batch 0's LR
        if event in (Event.EVAL_AFTER_ALL, Event.FIT_END) and self.remote and dist.get_global_rank() == 0:
            if self._upload is not None and self._upload.is_alive():
                if event != Event.FIT_END:
                    return  # the previous upload is still going (an S3 outage): training does not wait
                self._upload.join()
            if os.path.isfile(self.path):
                self._upload = threads.start("cpt-metrics-upload", self._send, Path(self.path).read_bytes())
                if event == Event.FIT_END:
                    self._upload.join()

    def _send(self, data: bytes) -> None:
        try:
            storage.write_bytes(storage.join(self.remote, "metrics.jsonl"), data)
        except Exception as exc:  # noqa: BLE001 - metrics stay local; training goes on; the next upload retries
            log.warning("could not upload metrics to %s: %r", self.remote, exc)


def first_lrs(state: State) -> dict[str, float]:
    """The LR batch 0 trains at, under ``lr_monitor``'s names (``lr-<optimizer>/group<i>``)."""
    return {
        f"lr-{opt.__class__.__name__}/group{i}": float(group["lr"])
        for opt in state.optimizers
        for i, group in enumerate(opt.param_groups)
    }


class ConfigLog(Callback):
    """Prints the run's config and logs it as hyperparameters, with secrets masked (``cpt.io.redact``); in
    place of llm-foundry's ``log_config``, which prints every resolved value."""

    KEY = "cpt_config_log"  # its llm-foundry registry key (pyproject.toml entry point)

    def __init__(self, config: dict):
        self.config = config

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            print(yaml.safe_dump(self.config, sort_keys=False, default_flow_style=None))
            logger.log_hyperparameters(self.config)
