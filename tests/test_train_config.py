"""A bad train config fails in the run plan (before any model or Trainer is built), naming the key or path."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_tiny

from cpt import config
from cpt.run.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yamls" / "tiny-cpu.yaml")


def test_good_config_expands_for_llmfoundry(tiny):
    out = Plan.from_config(load_tiny(tiny), TINY).to_foundry()
    assert out.model.name == "cpt_pythia" and out.model.pretrained is True
    assert out.model.attn_implementation == "sdpa"
    assert out.tokenizer.kwargs.pad_token == "<|padding|>"  # never EOS: EOS stays in the loss
    streams = out.train_loader.dataset.streams
    assert streams.downstream.proportion == pytest.approx(0.95) and streams.upstream.proportion == pytest.approx(0.05)
    assert out.train_loader.dataset.num_canonical_nodes == 1
    assert [e.label for e in out.eval_loaders] == ["upstream/pile-cc", "downstream/pile-cc"]
    assert out.scheduler.tokens_per_batch == 4 * 64
    assert "load_path" not in out or out.load_path is None  # nothing to resume: base weights only
    cadence = out.callbacks.cpt_eval_cadence
    assert (cadence.peak, cadence.early_until, cadence.early_interval) == (3, 3, 1)  # 0.125 x 24 batches


@pytest.mark.parametrize(
    "scheduler,expected",
    [  # early: every 2 batches to 0.25dur (batch 6 of 24), every 8; the cosine adds its peak (3)
        ("{name: cpt_constant, t_warmup: 0ba}", [2, 4, 6, 8, 16, 24]),
        ("{name: cpt_cosine, t_warmup: 0.125dur, t_max: 1dur, alpha_f: 0.1}", [2, 3, 4, 6, 8, 16, 24]),
        ("{name: cpt_cosine, t_warmup: 0ba, t_max: 1dur, alpha_f: 0.1}", [2, 4, 6, 8, 16, 24]),
    ],
)
def test_early_evaluation_is_the_same_for_every_schedule(tiny, scheduler, expected):
    from omegaconf import OmegaConf

    from cpt.config import check
    from cpt.eval.domains import EvalCadence
    from cpt.run.plan import cadence

    cfg = load_tiny(tiny, "cpt.eval.early={until: 0.25dur, interval: 2ba}")
    cfg.scheduler = OmegaConf.create(scheduler)  # replaced whole, not merged
    due = EvalCadence(**cadence(check(cfg)))
    assert [b for b in range(1, 25) if due.due(b)] == expected


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["variables.model=/nonexistent/step1"], "/nonexistent/step1 is not a Hugging Face model folder"),
        (["variables.data=/nonexistent"], "cpt.train.downstream: missing manifest /nonexistent/downstream/train"),
        (["max_seq_len=256", "cpt.eval.tokens_per_domain=256"], "max_seq_len=256 is longer than the model's"),
        (["max_seq_len=32"], "has samples of 64 tokens but max_seq_len is 32"),
        (["load_path=/x.pt"], "load_path restores an optimizer"),
        (["save_filename=ck-{batch}.pt"], "save_filename is cpt's"),
        (["cpt.eval.datasets.upstream.blends.b={Nope: 1.0}"], "domain 'Nope' is not in"),
        (["scheduler.tokens_per_batch=128"], r"scheduler.tokens_per_batch is cpt's \(.* = 256\); remove it"),
    ],
)
def test_bad_configs_fail_before_training(tiny, overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        Plan.from_config(load_tiny(tiny, *overrides), TINY)


def test_missing_s3_path_is_named(tiny, s3_bucket):
    with pytest.raises(config.ConfigError, match=f"missing manifest {s3_bucket}/nope/downstream/train/manifest.json"):
        Plan.from_config(load_tiny(tiny, f"variables.data={s3_bucket}/nope"), TINY)


def test_tasks_run_at_every_nth_evaluation_and_at_the_first_and_the_last(tiny):
    """cpt.eval.tasks_every: 3 with evaluations due at 2, 4, 6, 8, 16, 24 (early every 2 to batch 6, every 8)."""
    from types import SimpleNamespace

    from composer.core import Event

    from cpt.config import check
    from cpt.eval.domains import EvalCadence
    from cpt.run.plan import cadence

    cfg = load_tiny(tiny, "cpt.eval.early={until: 0.25dur, interval: 2ba}", "cpt.eval.tasks_every=3")
    cfg.scheduler = {"name": "cpt_constant", "t_warmup": "0ba"}
    due = EvalCadence(**cadence(check(cfg)))
    at = lambda b, event=Event.BATCH_END: due.for_tasks(SimpleNamespace(timestamp=SimpleNamespace(batch=b)), event)  # noqa: E731
    assert [b for b in range(1, 25) if due.due(b)] == [2, 4, 6, 8, 16, 24]
    assert [b for b in range(1, 25) if at(b)] == [6, 24]  # the 3rd and the 6th evaluation
    assert at(24, Event.FIT_END) is False  # the last batch was scored: not twice
    with pytest.raises(config.ConfigError, match="cpt.eval.tasks_every=0 must be at least 1"):
        check(load_tiny(tiny, "cpt.eval.tasks_every=0"))
    ended_between = EvalCadence(**cadence(check(cfg)))
    assert [b for b in range(1, 21) if ended_between.tasks_due(b)] == [6] and ended_between.for_tasks(
        SimpleNamespace(timestamp=SimpleNamespace(batch=20)), Event.FIT_END
    )  # a run that ends at 20: its last evaluation scores the tasks too


def test_the_written_out_foundry_keys_are_llm_foundrys_train_config():
    import dataclasses

    from llmfoundry.utils.config_utils import TrainConfig

    from cpt.config import FOUNDRY_KEYS

    assert FOUNDRY_KEYS == {f.name for f in dataclasses.fields(TrainConfig)}
