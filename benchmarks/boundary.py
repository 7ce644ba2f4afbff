"""Peak memory of hostile inputs at the trust boundary (``cpt.io.untrusted``), each in a fresh process.

    python benchmarks/boundary.py

- a decompression bomb: a ``.jsonl.zst`` of a few hundred KB that expands to 1 GiB (one line), read by the
  conversion's line reader (``cpt.data.sources.iter_lines``) with the default ``--max-doc-bytes``;
- a huge line in a task file: 1 GiB of one JSON line, checked by ``cpt.eval.tasks.check_file``;
- a stride-0 tensor: a checkpoint of a few KB whose tensor claims 4 GB, loaded by ``cpt.io.safe_load``.

Each figure is the child's peak RSS, and the same child's peak right before the hostile input is read (after its
imports), so the difference is what the input cost.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile

CHILD = r"""
import resource, sys
kind, path = sys.argv[1], sys.argv[2]
from cpt.data.sources import iter_lines
from cpt.eval.tasks import check_file
from cpt.io import safe_load
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = "read"
try:
    if kind == "bomb":
        n = sum(1 for _ in iter_lines(path, max_line_bytes=16 << 20))
        outcome = f"{n} lines, the long one cut at 16 MiB + 1"
    elif kind == "task":
        check_file(path, "language_modeling")
    else:
        safe_load.load(path)
except ValueError as exc:
    outcome = "refused: " + str(exc)[:90]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{before / 1024:.0f} {peak / 1024:.0f} {outcome}")
"""


def make(tmp: str) -> dict[str, tuple[str, str]]:
    import torch
    import zstandard

    bomb = os.path.join(tmp, "bomb.jsonl.zst")
    cctx = zstandard.ZstdCompressor(level=3)
    with open(bomb, "wb") as fh, cctx.stream_writer(fh) as w:
        w.write(b'{"text": "')
        chunk = b"a" * (1 << 24)
        for _ in range(64):  # 1 GiB
            w.write(chunk)
        w.write(b'"}\n{"text": "small"}\n')
    task = os.path.join(tmp, "task.jsonl")
    with open(task, "w") as fh:
        fh.write('{"context": "')
        for _ in range(64):
            fh.write("x" * (1 << 24))
        fh.write('", "continuation": "b"}\n')
    stride0 = os.path.join(tmp, "ep0-ba1-rank0.pt")
    torch.save({"state": {"model": {"w": torch.zeros(1).expand(1 << 30)}}}, stride0)
    return {
        "decompression bomb (1 GiB line)": ("bomb", bomb),
        "huge task line (1 GiB)": ("task", task),
        "stride-0 tensor (claims 4 GiB)": ("stride0", stride0),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cases = make(tmp)
        print(f"{'input':34} {'on disk':>10} {'before MB':>10} {'peak MB':>8} {'cost MB':>8}  outcome")
        for label, (kind, path) in cases.items():
            out = subprocess.run(
                [sys.executable, "-c", CHILD, kind, path], capture_output=True, text=True, check=True
            ).stdout.split(maxsplit=2)
            before, peak = int(out[0]), int(out[1])
            size = os.path.getsize(path)
            print(f"{label:34} {size / 1e6:>8.2f}MB {before:>10} {peak:>8} {peak - before:>8}  {out[2].strip()}")
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
