"""Background threads of a run (checkpoint upload, lock heartbeat, metrics upload) that never die silently."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def start(name: str, target: Callable[..., None], *args) -> threading.Thread:
    """Start a daemon thread running ``target(*args)``; an exception that escapes it is logged with its traceback.

    The targets catch and report their own per-item failures; this is the net under them."""

    def body() -> None:
        try:
            target(*args)
        except BaseException:
            log.exception("background thread %s stopped on an error", name)
            raise

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread
