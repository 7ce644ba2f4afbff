"""The causal LM loss without materialising the logits: a fused linear cross-entropy.

Pythia's 50k-token vocabulary makes the output projection and its cross-entropy a large share of a 410M
model's time and memory: a micro-batch of 16 x 2048 tokens has 3.3 GB of bf16 logits, and their float32
softmax more. Both implementations here take the final hidden states and the output weight and never hold the
logits of more than ``chunk`` tokens at once:

- ``liger``: Liger Kernel's ``LigerFusedLinearCrossEntropyLoss`` (Triton; CUDA only; the ``gpu`` extra);
- ``chunked``: pure PyTorch (any device, and the CPU tests): per chunk of tokens, the logits, their
  log-sum-exp in float32, the loss, and at once the gradients of the hidden states and of the weight, as
  Liger does; the backward pass only scales them.

``impl`` ``plain`` is the model's own forward (full logits, HF's loss); ``auto`` is ``liger`` on CUDA when it
is installed, ``chunked`` on CUDA otherwise, and ``plain`` on the CPU (numerics of CPU runs unchanged).

Labels are shifted as Hugging Face's causal LM loss does (position ``t`` predicts token ``t + 1``; ``-100``
is ignored) and the loss is the mean over the tokens that count.
"""

from __future__ import annotations

import functools

import torch

from cpt.spec import LOSS_IMPLS as IMPLS

IGNORE = -100


@functools.cache
def liger_available() -> bool:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or no Triton for this platform
        return False
    return True


def resolve(impl: str, device: torch.device | str) -> str:
    """The implementation ``impl`` means on ``device``; ``ValueError`` for an unknown name or liger off CUDA."""
    if impl not in IMPLS:
        raise ValueError(f"cpt.loss.impl={impl!r} is not one of {IMPLS}")
    cuda = torch.device(device).type == "cuda"
    if impl == "auto":
        return ("liger" if liger_available() else "chunked") if cuda else "plain"
    if impl == "liger" and not (cuda and liger_available()):
        raise ValueError("cpt.loss.impl=liger needs a CUDA device and liger-kernel (pip install -e '.[gpu]')")
    return impl


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels[:, t + 1]`` at position ``t``, and ``-100`` at the last position (HF's causal LM shift)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)


class _ChunkedLinearCE(torch.autograd.Function):
    """Sum of the cross-entropies of ``hidden @ weight.T`` against ``target``, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, scale: float):
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], target[start : start + chunk]
            logits = (h @ weight.t()).float()
            keep = t != IGNORE
            safe = torch.where(keep, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(keep, lse - picked, 0.0).sum()
            if grad_hidden is not None or grad_weight is not None:
                g = torch.softmax(logits, dim=-1)
                g[torch.arange(len(t), device=g.device), safe] -= 1.0
                g *= keep[:, None] * scale
                g = g.to(h.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = g @ weight
                if grad_weight is not None:
                    grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, impl: str, chunk: int = 8192
) -> torch.Tensor:
    """Mean causal LM loss of ``hidden`` (batch, seq, d) through ``weight`` (vocab, d) against unshifted
    ``labels`` (batch, seq), without the full logits."""
    target = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")(weight, flat, target)
    count = (target != IGNORE).sum().clamp(min=1)
    if torch.is_autocast_enabled(flat.device.type):  # the matmul in the autocast dtype, as the plain forward
        dtype = torch.get_autocast_dtype(flat.device.type)
        flat, weight = flat.to(dtype), weight.to(dtype)
    return _ChunkedLinearCE.apply(flat, weight, target, chunk, 1.0 / float(count))


@torch.no_grad()
def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int = 8192):
    """``(sum of cross-entropies, tokens counted)`` over already-shifted ``target``, chunk by chunk (evaluation)."""
    flat, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if torch.is_autocast_enabled(flat.device.type):
        dtype = torch.get_autocast_dtype(flat.device.type)
        flat, weight = flat.to(dtype), weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        logits = (flat[start : start + chunk] @ weight.t()).float()
        total += torch.nn.functional.cross_entropy(
            logits, target[start : start + chunk], ignore_index=IGNORE, reduction="sum"
        )
    return total, (target != IGNORE).sum()
