"""Ranks that start together share one download of an ``s3://`` Pythia folder."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

RESOLVE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from cpt.model import resolve_folder
print("PATH", resolve_folder(sys.argv[1]), flush=True)
"""


def test_concurrent_ranks_download_a_model_folder_once(tiny_pythia, s3_bucket, tmp_path):
    from cpt.io import storage

    url = f"{s3_bucket}/pythia/step143000"
    for f in sorted(Path(tiny_pythia).iterdir()):
        storage.upload_file(str(f), f"{url}/{f.name}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RESOLVE, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {line.split(" ", 1)[1] for out in outs for line in out.splitlines() if line.startswith("PATH ")}
    assert len(paths) == 1  # every rank got the same folder
    assert sum(out.count(f"downloaded {url}") for out in outs) == 1  # and one of them downloaded it
    folder = paths.pop()
    names = sorted(p.name for p in Path(tiny_pythia).iterdir())
    assert sorted(p.name for p in Path(folder).iterdir()) == names
    assert filecmp.cmpfiles(tiny_pythia, folder, names, shallow=False)[0] == names
