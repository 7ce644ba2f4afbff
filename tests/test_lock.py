"""The run lock: exactly one of several launches started together takes it; its heartbeat never dies silently."""

from __future__ import annotations

import json
import os
import time

import prewarmed
import pytest

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

    lock.acquire(folder)
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


RACER = """
import os, sys, time
from cpt.run import lock
base, trials = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):  # the start time, written once every racer has imported the stack
    time.sleep(0.01)
start = float(open(sys.argv[3]).read())
for k in range(trials):
    while time.time() < start + GAP * k:  # every racer is released at the same instant
        time.sleep(0.0005)
    try:
        lock.acquire(f"{base}/trial{k}")
        print(k, "took", flush=True)
    except lock.RunLockError:
        print(k, "refused", flush=True)
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_launches_released_together_exactly_one_takes_the_lock(where, tmp_path, s3_bucket):
    base = str(tmp_path / "runs") if where == "local" else f"{s3_bucket}/runs"
    trials, racers, gap = 10, 4, 0.5
    code = RACER.replace("GAP", str(gap))
    go = tmp_path / "start"
    procs = [  # real processes, forked from the prewarmed server (tests/prewarmed.py): no import to wait for
        prewarmed.shared().launch(["-c", code, base, str(trials), str(go)], cwd=str(tmp_path), env=dict(os.environ))
        for _ in range(racers)
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * racers
    (tmp_path / "start.part").write_text(str(time.time() + 0.5))
    os.replace(tmp_path / "start.part", go)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    takes = {k: 0 for k in range(trials)}
    for out in outs:
        for line in out.splitlines():
            k, what = line.split()
            takes[int(k)] += what == "took"
    assert takes == {k: 1 for k in range(trials)}, takes


def test_the_cache_lock_does_not_follow_a_symlink(tmp_path):
    from cpt.io.cache import locked

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / ".lock").symlink_to(victim)  # planted by someone else
    with pytest.raises(storage.StorageError, match="is a symlink"):
        with locked(str(folder)):
            pass
    assert victim.read_text() == "keep me"  # neither truncated nor locked through the link
