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


def test_a_model_folder_reuploaded_to_the_same_path_is_fetched_again(tmp_path, s3_bucket, caplog):
    """The cache is checked against the objects' ETags: a re-uploaded folder is not served from the old copy."""
    import torch
    from safetensors.torch import load_file

    from cpt.io import storage
    from cpt.model import resolve_folder, save_tiny_pythia

    url = f"{s3_bucket}/pythia/step1"
    first, second = save_tiny_pythia(str(tmp_path / "a"), seed=1), save_tiny_pythia(str(tmp_path / "b"), seed=2)
    storage.upload_folder(first, url)
    with caplog.at_level("INFO"):
        got = resolve_folder(url)
        again = resolve_folder(url)
    assert got == again and "using the cached copy of" in caplog.text
    weights = load_file(f"{got}/model.safetensors")
    assert all(torch.equal(v, load_file(f"{first}/model.safetensors")[k]) for k, v in weights.items())

    storage.upload_folder(second, url)  # the same path, new weights
    caplog.clear()
    with caplog.at_level("INFO"):
        got = resolve_folder(url)
    assert "changed since it was cached" in caplog.text and f"downloaded {url}" in caplog.text
    expected = load_file(f"{second}/model.safetensors")
    weights = load_file(f"{got}/model.safetensors")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not all(torch.equal(weights[k], load_file(f"{first}/model.safetensors")[k]) for k in expected)
