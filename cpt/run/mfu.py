"""MFU in every run: the peak dense FLOP/s of the GPU the run is on, for Composer's ``SpeedMonitor``.

Composer's own table recognises a device by substrings of its name and leaves MFU out for the rest (an H100
NVL, for one, matches none of its H100 rules). cpt looks the device up here and passes the number to the
speed monitor as ``gpu_flops_available``, so ``throughput/device/mfu`` is logged in training runs.
"""

from __future__ import annotations

# dense (not 2:4 sparse) tensor-core peaks in FLOP/s, from NVIDIA's data sheets
_BF16 = {"h100-sxm": 989e12, "h100-pcie": 756e12, "h100-nvl": 835e12, "h200-sxm": 989e12, "h200-nvl": 835e12,
         "gh200": 989e12, "a100": 312e12}  # fmt: skip
_PRECISION = {"amp_bf16": 1.0, "bf16": 1.0, "amp_fp16": 1.0, "fp16": 1.0, "fp32": None}  # fp32: no tensor-core peak


def device_kind(name: str) -> str | None:
    """``torch.cuda.get_device_name()`` -> a key of the table, or None for a GPU not in it."""
    n = name.lower()
    if "gh200" in n:
        return "gh200"
    for family in ("h200", "h100"):
        if family in n:
            if "nvl" in n:
                return f"{family}-nvl"
            if "pcie" in n or "hbm2e" in n:
                return f"{family}-pcie" if family == "h100" else f"{family}-nvl"
            return f"{family}-sxm"
    return "a100" if "a100" in n else None


def peak_flops(name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of the named GPU at ``precision`` (Composer's precision names), or None when unknown."""
    kind, scale = device_kind(name), _PRECISION.get(precision)
    if kind is None or scale is None:
        return None
    return _BF16[kind] * scale


def current_peak(precision: str) -> float | None:
    """The peak of this process's CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name(), precision)
