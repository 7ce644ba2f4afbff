"""Preemption: SIGKILL mid-run, relaunch the same command, and end bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import prewarmed
import pytest
import torch

from cpt.io import storage
from cpt.run import faults, samples
from cpt.run.checkpoints import checkpoints, find_resume, intact, prune

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yamls" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def setup(run_project):
    return run_project


def launch(setup: Path, run: str, save_folder: str, *extra: str, fault: str = "", ranks: int = 1):
    args = [
        f"variables.data={setup / 'data'}",
        f"variables.model={setup / 'model'}",
        f"variables.run_name={run}",
        f"variables.save_folder={save_folder}",
        f"cpt.run_dir={setup / 'runs'}",
        "cpt.num_workers=0",
        "max_duration=16ba",
        "save_interval=4ba",
        "cpt.eval.interval=8ba",
        "cpt.eval.early=null",
        "cpt.keep_checkpoints=0",
        "cpt.log_samples=true",
        *extra,
    ]
    env = {**os.environ, "CPT_CACHE": str(setup / "cache" / run), faults.ENV: fault}
    if ranks == 1:  # `python -m cpt.train`, forked from the prewarmed server (tests/prewarmed.py)
        return prewarmed.shared().launch(["-m", "cpt.train", str(TINY), *args], cwd=str(setup), env=env)
    return subprocess.Popen(  # `composer -n N`: a plain interpreter, the launcher's own start-up included
        [sys.executable, "-m", "composer.cli.launcher", "-n", str(ranks), "-m", "cpt.train", str(TINY), *args],
        cwd=setup,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


class Lines:
    """Collects a launch's output as it comes, so a test can act on what the run says."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def text(self) -> str:
        return "".join(self.lines)

    def finish(self) -> str:
        self.proc.wait(timeout=600)
        self.thread.join()
        assert self.proc.returncode == 0, self.text()[-4000:]
        return self.text()


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def final_state(save_folder: str, tmp: Path) -> dict:
    local = tmp / f"final-{abs(hash(save_folder))}.pt"
    storage.download_file(storage.join(save_folder, "ep0-ba16-rank0.pt"), str(local))
    return torch.load(local, map_location="cpu", weights_only=False)["state"]


def assert_identical(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")


def group_gone(pgid: int, within_s: float = 10.0) -> bool:
    """True once no process of the killed launch's process group is left (no stray workers)."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def reference(uninterrupted) -> str:
    """An uninterrupted run's save folder (local): what every interrupted run must end equal to."""
    return uninterrupted


def assert_same_end(reference: str, run: str, tmp: Path) -> None:
    a, b = final_state(reference, tmp), final_state(run, tmp)
    assert_identical(a["model"], b["model"], "model")
    assert_identical(a["optimizers"], b["optimizers"], "optimizers")
    ta, tb = a["timestamp"]["Timestamp"], b["timestamp"]["Timestamp"]
    assert (ta["batch"], ta["sample"], ta["token"]) == (tb["batch"], tb["sample"], tb["token"]) == (16, 64, 4096)
    assert a["dataset_state"] == b["dataset_state"]  # the data position: the same samples were consumed


def staging(setup: Path, run: str) -> Path:
    """The run's staging folder: ``<cache>/runs/<run name>-<key of its save folder>/staging``."""
    found = sorted((setup / "cache" / run / "runs").glob(f"{run}-*/staging"))
    return found[0] if found else setup / "cache" / run / "runs" / "not-yet" / "staging"


def wait_for(condition, what: str, timeout: float = 300, every: float = 0.005) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def test_kills_at_random_points_resume_bit_identical(setup, reference, s3_bucket):
    """SIGKILL during a step, an evaluation, a checkpoint write, an upload, and at a random moment; each time the
    same command resumes. The end state and the samples trained equal an uninterrupted run's."""
    shm_before = set(os.listdir("/dev/shm"))

    rng = random.Random(5)
    plan = [f"step:{rng.randint(5, 7)}", "eval:8", f"save:{rng.choice([8, 12])}", "upload:16"]
    run, outputs = f"{s3_bucket}/runs/killed", []
    for fault in plan:
        proc = launch(setup, "killed", run, fault=fault)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, out[-3000:]
        assert f"fault injected: SIGKILL during {fault.replace(':', ' at batch ')}" in out
        assert group_gone(proc.pid), f"processes of the run killed at {fault} outlived it"
        outputs.append(out)
    assert not any(b == 16 for b, _ in checkpoints(run))  # the upload of the last one was cut mid-way
    # and once at a random moment of the resumed run, killing its whole process group from outside
    proc = launch(setup, "killed", run)
    log = setup / "runs" / "killed" / "samples-rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and '"batch": 13' not in log.read_text():
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    outputs.append(finish(launch(setup, "killed", run)))
    assert sum("resuming from" in out for out in outputs) >= 3

    assert_same_end(reference, run, setup)
    ref_batches, ref_replays = samples.read(str(setup / "runs" / "trunk" / "samples-rank0.jsonl"))
    got_batches, replays = samples.read(str(log))
    assert len(ref_batches) == 16 and not ref_replays
    assert got_batches == ref_batches  # the same samples in the same order: none lost, none repeated
    assert Counter(s for b in got_batches for s in b) == Counter(s for b in ref_batches for s in b)
    assert replays and all(first == last for _, first, last in replays)  # a re-trained batch is the same batch
    assert not own_segments(shm_before, str(setup))  # the killed runs' shared memory was cleaned up


def own_segments(before: set[str], mine: str) -> set[str]:
    """Streaming segments created since ``before`` by runs whose local folders lie under ``mine``: each prefix's
    ``<prefix>_locals`` segment lists its streams' local folders. Another job's segments on this machine (a second
    training run beside the suite) are not this test's to judge."""
    new = set(os.listdir("/dev/shm")) - before
    prefixes = {n.split("_", 1)[0] for n in new if re.fullmatch(r"\d{6}_.+", n)}
    ours = set()
    for prefix in prefixes:
        try:
            with open(f"/dev/shm/{prefix}_locals", "rb") as fh:
                if mine.encode() in fh.read():
                    ours |= {n for n in new if n.startswith(f"{prefix}_")}
        except OSError:  # no registry: not a streaming run's, or already gone
            continue
    return ours


def test_two_ranks_killed_mid_run_resume_bit_identical(setup, s3_bucket):
    """``composer -n 2`` (DDP over gloo on CPU): both ranks are killed in batch 10; the same command resumes both
    from the newest checkpoint that reached S3 and ends equal to an uninterrupted two-rank run. (Batch 10: the
    checkpoint of batch 4 has had six batches to upload; that of batch 8 may still be on its way, and is lost.)"""
    two = ("device_train_microbatch_size=2",)  # the global batch of 4 split over 2 ranks
    reference = str(setup / "ref2-checkpoints")
    finish(launch(setup, "ref2", reference, *two, ranks=2))
    run = f"{s3_bucket}/runs/ranks"
    proc = launch(setup, "ranks", run, *two, ranks=2, fault="step:10")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "fault injected: SIGKILL during step at batch 10" in out, out[-3000:]
    assert group_gone(proc.pid), "a rank of the killed launch outlived it"
    present = [b for b, _ in checkpoints(run)]
    assert present in ([4], [8, 4]), present
    out = finish(launch(setup, "ranks", run, *two, ranks=2))
    assert f"resuming from {run}/ep0-ba{present[0]}-rank0.pt" in out
    assert_same_end(reference, run, setup)
    assert [b for b, _ in checkpoints(run)] == [16, 12, 8, 4]


def test_s3_outages_during_upload_and_at_resume_are_ridden_out(setup, reference, s3_bucket, moto):
    run = f"{s3_bucket}/runs/outage"
    proc = launch(setup, "outage", run, "cpt.s3_retry_s=60")
    wait_for(lambda: (staging(setup, "outage") / "ep0-ba4-rank0.pt").exists(), "the first checkpoint")
    restart = moto.outage(4.0)  # down from before its upload starts until 4 s later
    out = finish(proc)
    restart.join()
    assert "cannot upload" in out and "retrying in" in out and f"uploaded {run}/ep0-ba4-rank0.pt" in out
    assert_same_end(reference, run, setup)

    # as if preempted after batch 8: the relaunch finds S3 down while it looks for the checkpoint to resume
    for name in ("ep0-ba12-rank0.pt", "ep0-ba16-rank0.pt"):
        storage.delete(f"{run}/{name}")
    moto.stop()
    try:
        proc = launch(setup, "outage", run, "cpt.s3_retry_s=60")
        lines = Lines(proc)
        wait_for(lambda: "retrying in" in lines.text() or proc.poll() is not None, "a retry", every=0.1)
        time.sleep(2.0)
    finally:
        moto.start()
    out = lines.finish()
    assert "retrying in" in out and f"resuming from {run}/ep0-ba8-rank0.pt" in out
    assert_same_end(reference, run, setup)


def test_an_outage_beyond_the_limit_fails_clearly_and_keeps_the_last_good_checkpoint(setup, reference, s3_bucket, moto):
    run = f"{s3_bucket}/runs/limit"
    proc = launch(setup, "limit", run, "cpt.s3_retry_s=3")
    wait_for(lambda: (staging(setup, "limit") / "ep0-ba8-rank0.pt").exists(), "the second checkpoint")
    moto.stop()
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        moto.start()
    assert proc.returncode not in (0, -signal.SIGKILL), out[-3000:]
    assert "checkpoint upload failed" in out and "ep0-ba8-rank0.pt" in out
    assert "S3 unreachable" in out and "longer than the retry limit of 3s" in out
    assert [b for b, _ in checkpoints(run)] == [4]  # the last good checkpoint is there, and nothing partial
    assert find_resume(run, str(setup / "cache" / "limit-check")).name.endswith("ep0-ba4-rank0.pt")
    finish(launch(setup, "limit", run))  # the same command, once S3 is back, resumes and finishes
    assert_same_end(reference, run, setup)


def test_corrupt_newest_checkpoint_falls_back(setup, s3_bucket, tmp_path, caplog):
    folder = f"{s3_bucket}/runs/corrupt"
    good = setup / "good.pt"
    torch.save({"state": {"x": torch.arange(10)}}, good)
    storage.upload_file(str(good), f"{folder}/ep0-ba4-rank0.pt")
    data = bytearray(good.read_bytes())
    at = bytes(data).index((5).to_bytes(8, "little") + (6).to_bytes(8, "little"))
    data[at] ^= 0xFF  # one flipped byte inside the tensor's bytes: caught by the zip CRC
    storage.write_bytes(f"{folder}/ep0-ba8-rank0.pt", bytes(data))
    with caplog.at_level("WARNING"):
        got = find_resume(folder, str(tmp_path / "cache"))
    assert got is not None and got.name.endswith("ep0-ba4-rank0.pt")
    assert "skipping corrupt checkpoint" in caplog.text and "ep0-ba8-rank0.pt" in caplog.text
    assert find_resume(f"{s3_bucket}/runs/empty", str(tmp_path / "cache2")) is None


def test_prune_keeps_the_newest(s3_bucket, tmp_path):
    folder = f"{s3_bucket}/runs/prune"
    for b in (4, 8, 12, 16):
        storage.write_bytes(f"{folder}/ep0-ba{b}-rank0.pt", b"x")
    storage.write_bytes(f"{folder}/metrics.jsonl", b"{}")
    assert sorted(prune(folder, 2)) == ["ep0-ba4-rank0.pt", "ep0-ba8-rank0.pt"]
    assert [n for _, n in checkpoints(folder)] == ["ep0-ba16-rank0.pt", "ep0-ba12-rank0.pt"]
    assert storage.exists(f"{folder}/metrics.jsonl")


def test_a_changed_mixture_or_reconverted_data_is_refused_on_resume(setup, s3_bucket, tmp_path):
    """One finished 4-batch run, relaunched longer: onto the same domain names re-converted from other documents (the
    manifests' fingerprint changed), then with another mixture (the stored fingerprint no longer matches); both are
    refused and nothing trains onto the old checkpoint, until ``cpt.allow_fingerprint_change=true``."""
    import shutil

    from cpt.data.convert import DOMAIN_KEYS, convert
    from cpt.data.synthetic import TOKENIZER, write_jsonl

    folder = f"{s3_bucket}/runs/fp"
    finish(launch(setup, "fp", folder, "max_duration=4ba"))
    moved = tmp_path / "data"
    shutil.copytree(setup / "data", moved)
    shutil.rmtree(moved / "upstream" / "train")
    src = tmp_path / "other.jsonl"
    write_jsonl(src, {"Pile-CC": "science"}, docs=120, seed=99, domain_key=DOMAIN_KEYS["pile"])
    convert([str(src)], str(moved / "upstream"), "train", TOKENIZER, DOMAIN_KEYS["pile"], seq_len=64, workers=1)
    proc = launch(setup, "fp", folder, "max_duration=8ba", f"variables.data={moved}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "trained on data with fingerprint" in out, out[-3000:]
    assert [b for b, _ in checkpoints(folder)] == [4]  # nothing was trained onto the old checkpoint
    # same data, different mixture: the fingerprint stored in the checkpoint no longer matches
    proc = launch(setup, "fp", folder, "max_duration=8ba", "cpt.train.upstream.proportion=0.5")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "fingerprint" in out and "cpt.allow_fingerprint_change=true" in out
    assert [b for b, _ in checkpoints(folder)] == [4]
    allowed = ("max_duration=8ba", "cpt.train.upstream.proportion=0.5", "cpt.allow_fingerprint_change=true")
    finish(launch(setup, "fp", folder, *allowed))
    assert [b for b, _ in checkpoints(folder)] == [8, 4]


def test_second_launch_is_refused_while_the_first_is_alive(setup, s3_bucket):
    folder = f"{s3_bucket}/runs/twice"
    first = launch(setup, "twice", folder, "max_duration=40ba")
    deadline = time.time() + 300
    while time.time() < deadline and not storage.exists(f"{folder}/.cpt-lock.json"):
        time.sleep(0.2)
    second = launch(setup, "twice", folder, "max_duration=40ba")
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 3 and "refusing a second launch" in out and first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)  # a SIGKILLed run on this host is taken over at once
    first.wait()
    finish(launch(setup, "twice", folder, "max_duration=40ba"))
    assert not storage.exists(f"{folder}/.cpt-lock.json")  # released at the end


def test_a_corrupt_shard_on_s3_is_detected_by_hash_and_named(setup, s3_bucket):
    data = f"{s3_bucket}/data"
    for local in sorted((setup / "data").rglob("*")):
        if local.is_file():
            storage.upload_file(str(local), f"{data}/{local.relative_to(setup / 'data')}")
    shard = next(k for k in storage.list_prefix(f"{data}/downstream/train") if k.endswith(".mds"))
    url = f"{data}/downstream/train/{shard}"
    raw = bytearray(storage.read_bytes(url))
    raw[len(raw) // 2] ^= 0xFF
    storage.write_bytes(url, bytes(raw))

    verify = subprocess.run(
        [sys.executable, "-m", "cpt.cli", "verify", f"{data}/downstream/train", f"{data}/upstream/train"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert f"corrupt shard: {url}" in verify.stdout and "1 corrupt" in verify.stdout and "0 corrupt" in verify.stdout

    proc = launch(setup, "badshard", f"{s3_bucket}/runs/badshard", f"variables.data={data}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "Checksum failure" in out and shard.split("/")[-1] in out, out[-3000:]
    assert not checkpoints(f"{s3_bucket}/runs/badshard")  # nothing trained on it was saved


def test_a_checkpoint_cut_mid_write_in_a_local_folder_is_skipped(setup, reference):
    folder = setup / "local-save"
    proc = launch(setup, "localsave", str(folder), fault="save:8")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL and "fault injected: SIGKILL during save at batch 8" in out
    partial = folder / "ep0-ba8-rank0.pt"
    assert partial.exists() and not intact(str(partial))
    out = finish(launch(setup, "localsave", str(folder)))
    assert "skipping corrupt checkpoint" in out and "resuming from" in out and "ep0-ba4-rank0.pt" in out
    assert (folder / "ep0-ba8-rank0.pt.corrupt").exists() and intact(str(folder / "ep0-ba8-rank0.pt"))
    assert_same_end(reference, str(folder), setup)
    out = finish(launch(setup, "localsave", str(folder)))  # once more, after the end: nothing to do
    assert "localsave: already trained to max_duration (16 batches" in out


OWNER = """
import multiprocessing, os, signal, sys, time
from cpt.run import cleanup

def helper():
    time.sleep(600)

if __name__ == "__main__":
    cleanup.mark(sys.argv[1])
    child = multiprocessing.get_context("spawn").Process(target=helper, daemon=True)  # as Composer's uploader
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_a_killed_launchs_spawned_helpers_are_stopped(tmp_path):
    from cpt.run import cleanup

    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    folder = "s3://bucket/runs/orphans"
    owner = subprocess.Popen([sys.executable, str(script), folder], stdout=subprocess.PIPE, text=True)
    helper = int(owner.stdout.readline())
    try:
        assert cleanup.reap(folder) == [] and running(helper)  # its launch is alive: left alone
        owner.kill()  # SIGKILL: the spawned helper outlives it
        owner.wait()
        time.sleep(0.5)
        assert running(helper)
        assert cleanup.reap("s3://bucket/runs/another") == [] and running(helper)
        stopped = cleanup.reap(folder)  # the helper, and multiprocessing's resource tracker
        assert helper in stopped and len(stopped) <= 2
        wait_for(lambda: not running(helper), "the helper to stop", timeout=10, every=0.05)
    finally:
        if running(helper):
            os.kill(helper, signal.SIGKILL)


def test_a_second_run_on_the_host_leaves_the_first_runs_shared_memory_alone(setup, monkeypatch):
    """Two runs on one machine (two single-GPU jobs of a sweep): the second one's start-up removes only stale
    segments, not the live run's (streaming's ``clean_stale_shared_memory`` unlinked those); the second finishes,
    and the first keeps training after it."""
    tmp = setup / "tmp-shm"  # streaming skips prefixes whose file locks are in the temp folder: start at 0
    tmp.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmp))
    before = set(os.listdir("/dev/shm"))
    long_run = ("max_duration=120ba", "save_interval=120ba", "cpt.eval.interval=60ba")
    first = Lines(launch(setup, "shm-first", str(setup / "shm-first"), *long_run))
    log = setup / "runs" / "shm-first" / "samples-rank0.jsonl"
    wait_for(lambda: log.exists() and '"batch": 2' in log.read_text(), "the first run to train")
    mine = {n: os.stat(f"/dev/shm/{n}").st_ino for n in set(os.listdir("/dev/shm")) - before}  # the same names
    assert mine, "the first run created no shared memory"  # may be reused by the second run: compare inodes
    second = Lines(launch(setup, "shm-second", str(setup / "shm-second")))
    log2 = setup / "runs" / "shm-second" / "samples-rank0.jsonl"
    wait_for(lambda: log2.exists() and '"batch": 2' in log2.read_text(), "the second run to train")
    assert first.proc.poll() is None, "the first run ended before the second started: make it longer"
    now = {n: os.stat(f"/dev/shm/{n}").st_ino for n in os.listdir("/dev/shm")}
    gone = sorted(n for n, ino in mine.items() if now.get(n) != ino)
    assert not gone, f"the second run removed the live first run's shared memory: {gone}"
    second.finish()
    # the first run trains on past the second's whole life: 8 more batches, then it is stopped (not its end to wait)
    trained = log.read_text().count('"batch"')
    wait_for(lambda: log.read_text().count('"batch"') >= trained + 8 or first.proc.poll() is not None, "8 batches")
    assert first.proc.poll() is None and log.read_text().count('"batch"') >= trained + 8
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait()


def test_only_unmapped_streaming_segments_are_stale(tmp_path):
    """``cleanup.clean_stale``: a segment that a live process maps stays, as do fresh ones and other files."""
    from multiprocessing import shared_memory

    from cpt.run import cleanup

    base = 900000 + os.getpid() % 90000
    held = shared_memory.SharedMemory(f"{base:06}_locals", create=True, size=64)  # mapped by this process
    stale = shared_memory.SharedMemory(f"{base + 1:06}_barrier", create=True, size=64)
    fresh = shared_memory.SharedMemory(f"{base + 2:06}_barrier", create=True, size=64)
    other = shared_memory.SharedMemory(f"cpt-test-{base}", create=True, size=64)
    try:
        for seg in (stale, fresh, other):
            seg.close()  # unmapped, as a killed run's
        old = time.time() - 60
        for name in (stale.name, other.name):
            os.utime(f"/dev/shm/{name}", (old, old))
        removed = cleanup.clean_stale()
        assert stale.name in removed and not os.path.exists(f"/dev/shm/{stale.name}")
        for name in (held.name, fresh.name, other.name):
            assert os.path.exists(f"/dev/shm/{name}") and name not in removed, name
    finally:
        held.close()
        for name in (held.name, fresh.name, other.name, stale.name):
            if os.path.exists(f"/dev/shm/{name}"):
                os.unlink(f"/dev/shm/{name}")


def test_streaming_lock_files_of_dead_prefixes_are_removed_and_live_ones_kept():
    """``cleanup.clean_lock_files``: every run leaves ``/tmp/<prefix>_barrier_filelock``; those of prefixes without a
    segment (old enough) go, those of a live prefix and fresh ones stay."""
    import tempfile
    from multiprocessing import shared_memory

    from cpt.run import cleanup

    base = 800000 + os.getpid() % 90000
    live = shared_memory.SharedMemory(f"{base:06}_locals", create=True, size=64)
    paths = [os.path.join(tempfile.gettempdir(), f"{base + i:06}_barrier_filelock") for i in range(3)]
    try:
        for p in paths:
            open(p, "w").close()
        old = time.time() - 3600
        for p in paths[:2]:
            os.utime(p, (old, old))
        removed = cleanup.clean_lock_files()
        assert paths[1] in removed and not os.path.exists(paths[1])  # dead prefix, old file: removed
        assert os.path.exists(paths[0]) and os.path.exists(paths[2])  # a live prefix's, and a fresh one
    finally:
        live.close()
        live.unlink()
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)


def test_a_prefix_taken_by_a_run_started_at_the_same_moment_is_a_clear_error(monkeypatch, capsys):
    """streaming's prefix choice races between runs started together (check, then create): the loser gets a
    ``FileExistsError`` on its ``/<prefix>_locals``; ``cpt.train`` says what happened and what to do."""
    from cpt import train

    def raced(path, overrides):
        raise FileExistsError(17, "File exists", "/002149_locals")

    monkeypatch.setattr(train, "train_from_yaml", raced)
    assert train.main(["config.yaml"]) == 4
    err = capsys.readouterr().err
    assert "/002149_locals" in err and "another run on this host" in err and "relaunch" in err

    def other(path, overrides):
        raise FileExistsError(17, "File exists", "/work/out/model.bin")

    monkeypatch.setattr(train, "train_from_yaml", other)
    with pytest.raises(FileExistsError):
        train.main(["config.yaml"])
