"""On a CUDA GPU (``pytest -m gpu tests/test_gpu.py``): a real FSDP sharded checkpoint exports to the trained
weights, and the project's training path in bf16 is killed mid-run and resumes to an uninterrupted run's end."""

from __future__ import annotations

import signal

import pytest
import torch
from test_resume import assert_identical, final_state, finish, launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, seed: int):
        self.ids = torch.randint(1, 50000, (n, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_export_of_a_real_fsdp_sharded_checkpoint(tmp_path):
    """Composer's FSDP (bf16 compute, ``state_dict_type: sharded``) trains the project's model for 6 batches and
    saves ``ep0-ba6/`` through torch's distributed checkpoint; ``cpt export`` of that folder holds exactly the
    trained weights, and its logits match the FSDP model's own forward pass. On one GPU, FSDP turns FULL_SHARD
    into NO_SHARD: the folder has one rank's file, so gathering shards of several ranks is not covered here."""
    from composer import Trainer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.cli import main
    from cpt.model import CptPythia
    from cpt.pythia import save_tiny_pythia

    src = save_tiny_pythia(str(tmp_path / "step143000"), seed=3, seq_len=128)
    tokenizer = AutoTokenizer.from_pretrained(src, pad_token="<|padding|>")
    model = CptPythia(
        tokenizer=tokenizer,
        pretrained_model_name_or_path=src,
        pretrained=True,
        attn_implementation="sdpa",
        use_train_metrics=False,
    )
    trainer = Trainer(
        model=model,
        train_dataloader=torch.utils.data.DataLoader(RandomTokens(48, 128, 0), batch_size=8),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1),
        max_duration="6ba",
        device="gpu",
        precision="amp_bf16",
        parallelism_config={
            "fsdp": {"sharding_strategy": "FULL_SHARD", "mixed_precision": "PURE", "state_dict_type": "sharded"}
        },
        save_folder=str(tmp_path / "checkpoints"),
        save_interval="6ba",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    folder = tmp_path / "checkpoints" / "ep0-ba6"
    assert (folder / ".metadata").is_file() and list(folder.glob("__*.distcp")), sorted(
        str(p.relative_to(tmp_path)) for p in (tmp_path / "checkpoints").rglob("*")
    )
    trained = get_model_state_dict(trainer.state.model, options=StateDictOptions(full_state_dict=True))
    trained = {k.removeprefix("model."): v.detach().float().cpu() for k, v in trained.items()}

    assert main(["export", str(folder), str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).state_dict()
    weights = exported.state_dict()
    assert set(trained) <= set(weights)
    for name, value in trained.items():
        assert torch.equal(weights[name], value), name
    moved = max((weights[k] - base[k]).abs().max().item() for k in trained)
    assert moved > 1e-3  # the export holds trained weights, not the base model's

    ids = RandomTokens(2, 128, 1).ids.cuda()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    trainer.state.model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fsdp_logits = trainer.state.model(batch).logits.float()
        hf_logits = exported.cuda()(**batch).logits.float()
    diff = (fsdp_logits - hf_logits).abs().max().item()
    print(f"FSDP vs exported logits (bf16 autocast): max abs diff {diff:.3g}, weights moved up to {moved:.3g}")
    assert diff < 0.05 * fsdp_logits.abs().max().item()


def test_train_in_bf16_on_gpu_killed_and_resumed(tmp_path, tiny_project):
    """``python -m cpt.train`` on the GPU in ``amp_bf16``, killed after the backward pass of batch 6, resumes from
    its batch-4 checkpoint and ends at the uninterrupted run's clock, data position and (within GPU kernel
    non-determinism) weights and optimizer state."""
    domains = {"upstream": {"Pile-CC": "prose"}, "downstream": {"Github": "code"}}
    setup = tiny_project(tmp_path, domains, {"train": 120, "val": 10})
    bf16 = ("precision=amp_bf16", "callbacks.memory_monitor={}")  # the memory monitor logs on a GPU only
    reference = str(setup / "ref-checkpoints")
    finish(launch(setup, "ref", reference, *bf16))
    assert "memory/peak_allocated_mem" in (setup / "runs" / "ref" / "metrics.jsonl").read_text()
    run = str(setup / "killed-checkpoints")
    proc = launch(setup, "killed", run, *bf16, fault="step:6")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    out = finish(launch(setup, "killed", run, *bf16))
    assert "resuming from" in out and "ep0-ba4-rank0.pt" in out, out[-3000:]

    a, b = final_state(reference, tmp_path), final_state(run, tmp_path)
    ta, tb = a["timestamp"]["Timestamp"], b["timestamp"]["Timestamp"]
    assert (ta["batch"], ta["sample"], ta["token"]) == (tb["batch"], tb["sample"], tb["token"]) == (16, 64, 4096)
    assert a["dataset_state"] == b["dataset_state"]
    first = torch.load(f"{reference}/ep0-ba4-rank0.pt", map_location="cpu", weights_only=False)["state"]
    ref, got, start = (torch.cat([s["model"][k].float().flatten() for k in a["model"]]) for s in (a, b, first))
    worst = (ref - got).abs().max().item()
    relative = ((ref - got).norm() / (ref - start).norm()).item()
    print(
        f"resumed vs uninterrupted on GPU: max abs weight diff {worst:.3g} (bit-identical: {worst == 0.0}); "
        f"difference / update over batches 5-16 (L2) {relative:.3g}"
    )
    if worst == 0.0:
        assert_identical(a["optimizers"], b["optimizers"], "optimizers")
    assert relative < 0.05  # a wrong resume (LR, data or optimizer state) differs by the order of the update


def test_sharded_fsdp_checkpoints_go_through_cpts_upload_and_resume_rule(tmp_path, s3_bucket):
    """Composer's FSDP saves sharded checkpoints into a staging folder; cpt's uploader sends them to S3 with
    their completion marker; ``find_resume`` picks the newest complete folder and Composer loads it: the
    loaded weights equal the trained ones. (One GPU: llm-foundry turns FSDP off in ``cpt.train``, so the
    Trainer is built here, with cpt's callback, as ``cpt.run.plan`` configures it on several ranks.)"""
    from composer import Trainer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoTokenizer

    from cpt.io import storage
    from cpt.model import CptPythia
    from cpt.pythia import save_tiny_pythia
    from cpt.run import checkpoints
    from cpt.run.upload import CheckpointUpload

    src = save_tiny_pythia(str(tmp_path / "step143000"), seed=3, seq_len=128)
    save, staging = f"{s3_bucket}/runs/fsdp/checkpoints", str(tmp_path / "staging")

    def trainer(duration: str, load_path: str | None = None) -> Trainer:
        model = CptPythia(
            tokenizer=AutoTokenizer.from_pretrained(src, pad_token="<|padding|>"),
            pretrained_model_name_or_path=src,
            pretrained=True,
            attn_implementation="sdpa",
            use_train_metrics=False,
        )
        return Trainer(
            model=model,
            train_dataloader=torch.utils.data.DataLoader(RandomTokens(96, 128, 0), batch_size=8),
            optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1),
            max_duration=duration,
            device="gpu",
            precision="amp_bf16",
            parallelism_config={
                "fsdp": {"sharding_strategy": "FULL_SHARD", "mixed_precision": "PURE", "state_dict_type": "sharded"}
            },
            save_folder=staging,
            save_filename=checkpoints.SAVE_FILENAME,
            save_interval="4ba",
            save_num_checkpoints_to_keep=-1,
            callbacks=[CheckpointUpload(save, staging, keep=0, sharded=True)],
            load_path=load_path,
            progress_bar=False,
            log_to_console=False,
        )

    def weights(t: Trainer) -> dict:
        full = get_model_state_dict(t.state.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().float().cpu() for k, v in full.items()}

    first = trainer("8ba")
    first.fit()
    trained = weights(first)
    assert [b for b, _ in checkpoints.checkpoints(save)] == [8, 4]
    assert checkpoints.MARKER in storage.list_prefix(f"{save}/ep0-ba8")
    resume = checkpoints.find_resume(save, str(tmp_path / "cache"))
    assert resume is not None and resume.sharded and resume.batch == 8

    second = trainer("12ba", load_path=resume.name)
    assert int(second.state.timestamp.batch) == 8
    loaded = weights(second)
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    second.fit()
    assert [b for b, _ in checkpoints.checkpoints(save)] == [12, 8, 4]
