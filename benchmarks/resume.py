"""Resume under faults: the tiny CPU model, checkpoints on a loopback S3 server (moto), ``yamls/tiny-cpu.yaml``.

    python benchmarks/resume.py [--far 256]

Prints three things, all measured in this run:

1. relaunch -> first resumed step, when the newest checkpoint is at batch 32, ``--far``/2 and ``--far``.
   The relaunch kills itself (``CPT_FAULT=step:<batch>``) after the backward pass of its first step, so
   the time covers start-up, the listing and download of the checkpoint, restoring the model, optimizer,
   clock and data position, and one step. Flat times mean the data position is restored, not replayed.
2. checkpoint save and upload time of the tiny model, from the runs' own ``saved``/``uploaded`` lines.
3. faults injected and survived: SIGKILL during a step, an evaluation, a checkpoint write, an upload and
   at a random moment, each followed by the same command. Survived means the run then finished with
   weights, optimizer state and data position bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yamls" / "tiny-cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    def __init__(self, project: Path, max_batches: int, save_every: int):
        self.project, self.max_batches, self.save_every = project, max_batches, save_every
        self.outputs: list[str] = []

    def start(self, run: str, folder: str, fault: str = "") -> subprocess.Popen:
        args = [
            f"variables.data={self.project / 'data'}",
            f"variables.model={self.project / 'model'}",
            f"variables.run_name={run}",
            f"variables.save_folder={folder}",
            f"cpt.run_dir={self.project / 'runs'}",
            "cpt.num_workers=0",
            "cpt.keep_checkpoints=0",
            f"max_duration={self.max_batches}ba",
            f"save_interval={self.save_every}ba",
            "cpt.eval.interval=8ba",
            "cpt.eval.early=null",
            "console_log_interval=1000ba",
        ]
        env = {**os.environ, "CPT_CACHE": str(self.project / "cache" / run), "CPT_FAULT": fault}
        return subprocess.Popen(
            [sys.executable, "-m", "cpt.train", str(TINY), *args],
            cwd=self.project,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, run: str, folder: str, fault: str = "") -> tuple[int, str, float]:
        t0 = time.perf_counter()
        proc = self.start(run, folder, fault)
        out, _ = proc.communicate(timeout=1200)
        self.outputs.append(out)
        return proc.returncode, out, time.perf_counter() - t0


def final_state(folder: str, batch: int, tmp: Path) -> dict:
    import torch

    from cpt.io import storage

    local = tmp / f"final-{abs(hash(folder))}.pt"
    storage.download_file(storage.join(folder, f"ep0-ba{batch}-rank0.pt"), str(local))
    return torch.load(local, map_location="cpu", weights_only=False)["state"]


def identical(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def same_end(ref: str, run: str, batch: int, tmp: Path) -> dict[str, bool]:
    """Which parts of the final state are bit-identical (the clock by batch, sample and token, not wall time)."""
    a, b = final_state(ref, batch, tmp), final_state(run, batch, tmp)
    ta, tb = a["timestamp"]["Timestamp"], b["timestamp"]["Timestamp"]
    parts = {k: identical(a[k], b[k]) for k in ("model", "optimizers", "dataset_state")}
    parts["clock"] = all(ta[k] == tb[k] for k in ("batch", "sample", "token"))
    return parts


def relaunch_times(launch: Launcher, bucket: str, far: int) -> list[tuple[int, float]]:
    from cpt.io import storage
    from cpt.run.checkpoints import checkpoints

    folder = f"{bucket}/runs/far"
    rc, out, _ = launch.run("far", folder)
    assert rc == 0, out[-3000:]
    rows = []
    for point in (far, far // 2, 32):  # newest first: deleting the newer checkpoints walks the run back
        for batch, name in checkpoints(folder):
            if batch > point:
                storage.delete(storage.join(folder, name))
        rc, out, seconds = launch.run("far", folder, fault=f"step:{point}")
        assert rc == -signal.SIGKILL and f"resuming from {folder}/ep0-ba{point}-rank0.pt" in out, out[-3000:]
        rows.append((point, seconds))
        print(f"  resume at batch {point:4d} ({point * 4:5d} samples seen): relaunch -> first step {seconds:.1f}s")
    return rows


def fault_run(launch: Launcher, bucket: str, tmp: Path, seed: int) -> tuple[int, int]:
    """The kills of tests/test_resume.py, then the end state against an uninterrupted run."""
    ref = f"{bucket}/runs/ref"
    rc, out, _ = launch.run("ref", ref)
    assert rc == 0, out[-3000:]
    rng = random.Random(seed)
    plan = [f"step:{rng.randint(5, 7)}", "eval:8", f"save:{rng.choice([8, 12])}", "upload:16"]
    folder, injected = f"{bucket}/runs/faults", 0
    for fault in plan:
        rc, out, _ = launch.run("faults", folder, fault=fault)
        injected += rc == -signal.SIGKILL and "fault injected" in out
        print(f"  {fault:10s} -> exit {rc}")
    proc = launch.start("faults", folder)
    time.sleep(rng.uniform(6.0, 12.0))  # start-up takes about 6 s on 2 cores: a random point in the run
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        injected += 1
        print("  random     -> killed from outside")
    launch.outputs.append(proc.communicate()[0])
    rc, out, _ = launch.run("faults", folder)
    parts = same_end(ref, folder, 16, tmp) if rc == 0 else {}
    survived = injected if parts and all(parts.values()) else 0
    print(f"  final relaunch exit {rc}; bit-identical to the uninterrupted run: {parts}")
    return injected, survived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--far", type=int, default=256, help="the furthest resume point, in batches")
    parser.add_argument("--seed", type=int, default=5, help="seeds the fault points")
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    from cpt.data.synthetic import tiny_project

    port = free_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    bucket = "s3://bench"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            domains = {"upstream": {"Pile-CC": "prose"}, "downstream": {"Github": "code"}}
            project = tiny_project(Path(tmp), domains, {"train": 200, "val": 10})
            cores = os.cpu_count()
            print(f"1. relaunch -> first resumed step (a checkpoint every 32 batches of 4 x 64 tokens, {cores} cores)")
            far = Launcher(project, args.far + 32, 32)  # the furthest resume point is not the end
            rows = relaunch_times(far, bucket, args.far)
            spread = max(s for _, s in rows) / min(s for _, s in rows)
            print(f"  slowest / fastest: {spread:.2f}x over {rows[-1][0]}..{rows[0][0]} batches seen")

            print("3. faults (16 batches, checkpoints every 4)")
            short = Launcher(project, 16, 4)
            injected, survived = fault_run(short, bucket, Path(tmp), args.seed)

            text = "".join(far.outputs + short.outputs)
            saves = [(float(m[1]), float(m[2])) for m in re.finditer(r"saved \S+ \(([\d.]+) MB\) in ([\d.]+)s", text)]
            ups = [(float(m[1]), float(m[2])) for m in re.finditer(r"uploaded \S+ \(([\d.]+) MB\) in ([\d.]+)s", text)]
            print(f"2. checkpoint of the tiny model ({saves[0][0]:.1f} MB: weights, AdamW state, data position):")
            print(f"  save to local disk: median {statistics.median(s for _, s in saves):.2f}s over {len(saves)}")
            print(f"  upload to S3:       median {statistics.median(s for _, s in ups):.2f}s over {len(ups)}")
            print(f"faults injected: {injected}, survived: {survived}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
