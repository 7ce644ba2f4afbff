"""Speed levers' switches and MFU: the GPU table, and the speed monitor getting the peak in every run."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_tiny

from cpt import config
from cpt.run import mfu
from cpt.run.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yamls" / "tiny-cpu.yaml")


@pytest.mark.parametrize(
    "name,precision,peak",
    [
        ("NVIDIA H200", "amp_bf16", 989e12),
        ("NVIDIA H200 NVL", "amp_bf16", 835e12),
        ("NVIDIA H100 80GB HBM3", "amp_bf16", 989e12),
        ("NVIDIA H100 PCIe", "amp_bf16", 756e12),
        ("NVIDIA H100 NVL", "amp_bf16", 835e12),  # Composer's table has no rule that matches this name
        ("NVIDIA GH200 480GB", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "amp_fp16", 312e12),
        ("NVIDIA H200", "fp32", None),
        ("Tesla T4", "amp_bf16", None),
    ],
)
def test_peak_flops_table(name, precision, peak):
    assert mfu.peak_flops(name, precision) == peak


def plan(tiny, *overrides) -> Plan:
    return Plan.from_config(load_tiny(tiny, *overrides), TINY)


def test_the_speed_monitor_gets_the_gpus_peak(tiny, monkeypatch):
    assert "speed_monitor" not in plan(tiny).to_foundry().callbacks  # on the CPU: nothing to add
    monkeypatch.setattr(mfu, "current_peak", lambda precision: mfu.peak_flops("NVIDIA H200", "amp_bf16"))
    out = plan(tiny).to_foundry()
    assert out.callbacks.speed_monitor.gpu_flops_available == 989e12
    kept = plan(tiny, "callbacks.speed_monitor={window_size: 5, gpu_flops_available: 1.0e15}").to_foundry()
    assert kept.callbacks.speed_monitor.gpu_flops_available == 1e15 and kept.callbacks.speed_monitor.window_size == 5


@pytest.mark.parametrize("impl", ["plain", "chunked", "auto"])
def test_the_loss_switch_reaches_llm_foundrys_model_config(tiny, impl):
    out = plan(tiny, f"cpt.loss.impl={impl}", "cpt.loss.chunk=512").to_foundry()
    assert out.model.loss_impl == impl and out.model.loss_chunk == 512


def test_a_bad_loss_switch_is_refused(tiny):
    with pytest.raises(config.ConfigError, match="cpt.loss.impl='fast' must be one of auto, plain, chunked, liger"):
        plan(tiny, "cpt.loss.impl=fast")
