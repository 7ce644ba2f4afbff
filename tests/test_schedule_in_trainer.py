"""The LR convention, pinned against what Composer actually applies during a real ``Trainer.fit``."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Event, Trainer
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from cpt.optim import schedules

LR = 0.01
BATCH, SEQ = 4, 8  # tokens_per_batch is BATCH x SEQ for these tests


class RecordLR(Callback):
    """The LR in the optimizer when each batch starts, i.e. the LR that batch trains at."""

    def __init__(self):
        self.lrs: dict[int, float] = {}

    def run_event(self, event, state, logger):
        if event == Event.BATCH_START:
            self.lrs[int(state.timestamp.batch)] = state.optimizers[0].param_groups[0]["lr"]


class Preempted(Exception):
    pass


class Preempt(Callback):
    """Dies as batch ``at_batch`` starts, after the checkpoint before it was written."""

    def __init__(self, at_batch: int):
        self.at_batch = at_batch

    def batch_start(self, state, logger):
        if int(state.timestamp.batch) == self.at_batch:
            raise Preempted


def make_trainer(scheduler, max_duration, **kwargs):
    torch.manual_seed(0)
    model = ComposerClassifier(torch.nn.Linear(SEQ, 2), num_classes=2)
    data = TensorDataset(torch.randn(400, SEQ), torch.randint(0, 2, (400,)))
    recorder = RecordLR()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=BATCH),
        optimizers=torch.optim.SGD(model.parameters(), lr=LR),
        schedulers=scheduler,
        max_duration=max_duration,
        callbacks=[recorder],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        **kwargs,
    )
    return trainer, recorder


@pytest.mark.parametrize(
    "scheduler",
    [
        schedules.CosineScheduler(t_warmup="4ba", t_max="1dur", alpha_f=0.1),
        schedules.CosineScheduler(t_warmup="128tok", t_max="1dur", alpha_f=0.1, tokens_per_batch=BATCH * SEQ),
        schedules.InfiniteScheduler(t_warmup="3ba", t_cooldown="5ba", alpha_const=0.5, t_anneal="14ba", t_max="1dur"),
        schedules.WSDScheduler(t_warmup="2ba", t_decay="0.25dur", decay="1-sqrt"),
    ],
    ids=["cosine-ba", "cosine-tok", "infinite", "wsd"],
)
def test_batch_n_trains_at_multiplier_n(scheduler):
    trainer, rec = make_trainer(scheduler, "20ba")
    trainer.fit()
    clock = schedules.Clock("20ba", BATCH * SEQ)
    assert sorted(rec.lrs) == list(range(20))
    for n, lr in rec.lrs.items():
        assert lr == pytest.approx(LR * scheduler.multiplier(n, clock), abs=1e-12), n
    if isinstance(scheduler, schedules.CosineScheduler):
        # spelled out: batch 0 trains at exactly 0, batch 1 at a quarter of the peak, batch 4 at the peak
        assert (rec.lrs[0], rec.lrs[1], rec.lrs[4]) == (0.0, pytest.approx(LR / 4), pytest.approx(LR))


def test_composer_builtin_lags_by_one_batch():
    """Why the correction exists: Composer's own warmup trains batches 0 and 1 both at 0."""
    from composer.optim import LinearWithWarmupScheduler

    trainer, rec = make_trainer(LinearWithWarmupScheduler(t_warmup="4ba", alpha_f=1.0), "6ba")
    trainer.fit()
    assert rec.lrs[0] == rec.lrs[1] == 0.0 and rec.lrs[2] == pytest.approx(LR / 4)


def test_resumed_run_has_identical_lr_sequence(tmp_path):
    sched = lambda: schedules.CosineScheduler(t_warmup="3ba", t_max="1dur", alpha_f=0.1)  # noqa: E731
    full, rec_full = make_trainer(sched(), "16ba")
    full.fit()

    first, rec_a = make_trainer(sched(), "16ba", save_folder=str(tmp_path / "ck"), save_interval="6ba")
    first.state.callbacks.append(Preempt(at_batch=6))
    with pytest.raises(Preempted):
        first.fit()
    first.close()
    del rec_a.lrs[6]  # batch 6 started, then the machine went away
    second, rec_b = make_trainer(sched(), "16ba", load_path=str(tmp_path / "ck" / "ep0-ba6-rank0.pt"))
    second.fit()
    resumed = {**rec_a.lrs, **rec_b.lrs}
    assert sorted(rec_b.lrs) == list(range(6, 16))
    assert resumed == pytest.approx(rec_full.lrs, abs=0)
