"""The checkpoint module: names, direct-children listing, the resume choice and pruning, monolithic and sharded.

Sharded checkpoints are written in Composer's layout (``ep<E>-ba<B>/__<rank>_0.distcp`` + ``.metadata``) by
``torch.distributed.checkpoint`` from two gloo processes, and uploaded by cpt's ``Uploader`` to the loopback
S3 server, as a sharded run's ranks do.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import prewarmed
import pytest
import torch

from cpt.io import storage
from cpt.run import faults
from cpt.run.checkpoints import MARKER, checkpoints, find_resume, prune

RANK = """
import logging, os, sys
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from cpt.io import storage
from cpt.run.upload import Uploader

logging.basicConfig(level=logging.INFO, format="%(message)s")
staging, save_folder, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
storage.set_retry_limit(5)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
up = Uploader(save_folder, staging, sharded=True, rank=rank, world_size=world)
up.start()
state = {f"rank{rank}": torch.full((1 << 20,), float(batch * 10 + rank))}  # 4 MiB per rank
dcp.save(state, checkpoint_id=os.path.join(staging, f"ep0-ba{batch}"))
up.collect()
try:
    up.wait()
finally:
    up.stop()
print("RANK DONE", rank, flush=True)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_sharded(tmp: Path, save_folder: str, batch: int, fault_rank: int | None = None) -> list[tuple[int, str]]:
    """Two gloo ranks save ``ep0-ba<batch>`` into a staging folder and upload it; ``(returncode, output)``."""
    port, procs = _port(), []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            faults.ENV: f"upload:{batch}" if rank == fault_rank else "",
        }
        procs.append(  # forked from the prewarmed server (tests/prewarmed.py)
            prewarmed.shared().launch(["-c", RANK, str(tmp / "staging"), save_folder, str(batch)], str(tmp), env)
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def load_sharded(folder: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    state = {f"rank{r}": torch.empty(1 << 20) for r in range(2)}
    dcp.load(state, checkpoint_id=folder)
    return state


def test_sharded_complete_incomplete_corrupt_and_killed_mid_upload(s3_bucket, tmp_path, caplog):
    save = f"{s3_bucket}/runs/sharded/checkpoints"
    results = save_sharded(tmp_path, save, 4)
    assert all(rc == 0 for rc, _ in results), results
    names = set(storage.list_prefix(f"{save}/ep0-ba4"))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", MARKER} <= names
    assert not (tmp_path / "staging" / "ep0-ba4").exists()  # staged files go once uploaded

    # rank 1 is SIGKILLed half-way through uploading its shard of batch 8: rank 0 never marks it complete
    (rc0, out0), (rc1, out1) = save_sharded(tmp_path, save, 8, fault_rank=1)
    assert rc1 == -signal.SIGKILL and "fault injected: SIGKILL during upload at batch 8" in out1, out1[-2000:]
    assert rc0 != 0 and "not every rank uploaded its shard" in out0, out0[-2000:]
    assert not storage.exists(f"{save}/ep0-ba8/{MARKER}") and not storage.exists(f"{save}/ep0-ba8/__1_0.distcp")

    # batch 12 complete, then one of its shards corrupted in place (same size); batch 16 complete, then a shard lost
    for batch in (12, 16):
        assert all(rc == 0 for rc, _ in save_sharded(tmp_path, save, batch))
    url = f"{save}/ep0-ba12/__1_0.distcp"
    raw = bytearray(storage.read_bytes(url))
    raw[len(raw) // 2] ^= 0xFF
    storage.write_bytes(url, bytes(raw))
    storage.delete(f"{save}/ep0-ba16/__0_0.distcp")
    # a complete checkpoint copied into a subfolder is not the save folder's
    for key in storage.list_prefix(f"{save}/ep0-ba4"):
        storage.write_bytes(f"{save}/keep/ep0-ba99/{key}", storage.read_bytes(f"{save}/ep0-ba4/{key}"))

    assert [b for b, _ in checkpoints(save)] == [16, 12, 8, 4]
    with caplog.at_level("WARNING"):
        got = find_resume(save, str(tmp_path / "cache"))
    assert got is not None and got.sharded and got.batch == 4
    assert "ep0-ba16: __0_0.distcp is missing" in caplog.text
    assert "ep0-ba12: __1_0.distcp does not match the size and sha256 in its marker" in caplog.text
    assert "ep0-ba8: it has no completion marker" in caplog.text
    state = load_sharded(got.name)  # what each rank wrote for batch 4: 40 and 41 everywhere
    assert torch.equal(state["rank0"], torch.full((1 << 20,), 40.0))
    assert torch.equal(state["rank1"], torch.full((1 << 20,), 41.0))

    assert sorted(prune(save, 2)) == ["ep0-ba4", "ep0-ba8"]  # whole folders
    assert not storage.list_prefix(f"{save}/ep0-ba4") and not storage.list_prefix(f"{save}/ep0-ba8")
    assert [b for b, _ in checkpoints(save)] == [16, 12]
    assert MARKER in storage.list_prefix(f"{save}/keep/ep0-ba99")  # a subfolder is never pruned


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_checkpoint_in_a_subfolder_is_neither_resumed_from_nor_pruned(where, s3_bucket, tmp_path):
    folder = str(tmp_path / "save") if where == "local" else f"{s3_bucket}/runs/sub"
    good = tmp_path / "good.pt"
    torch.save({"state": {"x": torch.arange(10)}}, good)
    for name in ("ep0-ba4-rank0.pt", "ep0-ba8-rank0.pt", "keep/ep0-ba99-rank0.pt", "keep/ep0-ba1-rank0.pt"):
        storage.upload_file(str(good), storage.join(folder, name))
    assert checkpoints(folder) == [(8, "ep0-ba8-rank0.pt"), (4, "ep0-ba4-rank0.pt")]
    got = find_resume(folder, str(tmp_path / "cache"))
    assert got is not None and got.batch == 8 and got.name.endswith("ep0-ba8-rank0.pt") and "keep" not in got.name
    assert prune(folder, 1) == ["ep0-ba4-rank0.pt"]
    assert storage.exists(storage.join(folder, "keep/ep0-ba99-rank0.pt"))
    assert storage.exists(storage.join(folder, "keep/ep0-ba1-rank0.pt"))
