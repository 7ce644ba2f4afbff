"""The run lock's heartbeat thread: no error of any kind ends it silently."""

from __future__ import annotations

import json
import time

from cpt.io import storage
from cpt.run import lock


def test_heartbeat_survives_an_error_that_is_not_a_storage_error(tmp_path, monkeypatch, caplog):
    folder = str(tmp_path / "save")
    real, calls = lock.heartbeat, []

    def flaky(save_folder: str) -> None:
        calls.append(time.time())
        if len(calls) == 1:
            raise ValueError("a bug in the heartbeat, not an S3 error")
        real(save_folder)

    monkeypatch.setattr(lock, "heartbeat", flaky)
    beat = lock.RunLock(folder, every_s=0.05)
    with caplog.at_level("WARNING"):
        beat.fit_start(None, None)
        deadline = time.time() + 10
        while len(calls) < 3 and time.time() < deadline:
            time.sleep(0.02)
        assert beat._thread.is_alive()
        held = json.loads(storage.read_bytes(storage.join(folder, lock.LOCK)))  # later beats wrote the lock
        assert time.time() - held["heartbeat"] < 5
        beat.fit_end(None, None)
    assert len(calls) >= 3
    assert "could not refresh the run lock" in caplog.text and "ValueError" in caplog.text
    assert not storage.exists(storage.join(folder, lock.LOCK))  # released at the end


def test_an_error_escaping_a_background_thread_is_logged(caplog):
    from cpt.run import threads

    def broken() -> None:
        raise KeyError("lost")

    with caplog.at_level("ERROR"):
        threads.start("cpt-test-thread", broken).join(timeout=10)
    assert "background thread cpt-test-thread stopped on an error" in caplog.text and "KeyError" in caplog.text
