"""Ranks that start together share one download of an ``s3://`` Pythia folder."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    from cpt.model import resolve_folder
    from cpt.pythia import save_tiny_pythia

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


@pytest.mark.parametrize(
    "name, total, non_embedding",
    [("70m", 70_426_624, 18_915_328), ("160m", 162_322_944, 85_056_000), ("410m", 405_334_016, 302_311_424)],
)
def test_pythia_architectures_by_name_have_the_papers_parameter_counts(name, total, non_embedding):
    """Counts from the Pythia paper's table (Biderman et al. 2023), against a model built from the name."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from cpt import pythia

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**pythia.config(name)))
    params = sum(p.numel() for p in model.parameters())
    embeddings = model.gpt_neox.embed_in.weight.numel() + model.embed_out.weight.numel()
    assert (params, params - embeddings) == (total, non_embedding)


def test_a_run_from_scratch_names_its_architecture_without_a_folder(tiny):
    from conftest import load_tiny

    from cpt.run.plan import Plan

    plan = Plan.from_config(load_tiny(tiny, "variables.model=pythia:70m", "cpt.from_scratch=true"), "tiny")
    assert (plan.model_config["hidden_size"], plan.model_config["num_hidden_layers"]) == (512, 6)
    assert sorted(os.listdir(plan.model_dir))[:1] == ["config.json"] and "model.safetensors" not in os.listdir(
        plan.model_dir
    )
    with pytest.raises(Exception, match="holds no weights"):  # continual pre-training needs weights
        Plan.from_config(load_tiny(tiny, "variables.model=pythia:70m"), "tiny")
    with pytest.raises(Exception, match="pythia:7b is not a Pythia size"):
        Plan.from_config(load_tiny(tiny, "variables.model=pythia:7b", "cpt.from_scratch=true"), "tiny")
