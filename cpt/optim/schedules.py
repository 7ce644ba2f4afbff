r"""Re-warming learning-rate schedules for continual pre-training, as Composer schedulers.

Each schedule is written once, as a pure function ``*_multiplier(t, ...) -> float`` of the time ``t``
in batches (a float), with every duration already in batches. The classes below only turn Composer's
``state.timestamp`` and duration strings (``tok``, ``ba``, ``dur``) into those numbers.

**Which LR a batch trains at.** Batch ``n`` (0-based: ``n`` batches have completed before it) trains at
``lr x multiplier(n)``. So batch 0 of a warmup from 0 trains at exactly 0, batch 1 at ``lr / t_warmup``,
and batch ``t_warmup`` at the peak. Composer evaluates a scheduler once when the Trainer is built (that
value trains batch 0) and then after each batch ``n``, *before* its clock advances (that value trains batch
``n + 1``); left alone this makes batches 0 and 1 both train at ``multiplier(0)``. These schedulers
correct for it: a call from a training step evaluates ``multiplier(n + 1)``. ``tests/test_schedules.py``
pins this against the LR read from the optimizer during a real ``Trainer.fit``.

**Durations.** ``"500ba"``, ``"2000000tok"`` or ``"0.01dur"`` (a fraction of the run's ``max_duration``).
Token durations become batches through ``tokens_per_batch`` (global batch x sequence length, which
``cpt`` fills in from the train config: samples are packed, so every batch has exactly that many
tokens). The clock starts at 0 at the first step of the continual run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

UNITS = ("tok", "ba", "dur")


# ---- pure multipliers ----------------------------------------------------------------------------


def warmup_multiplier(t: float, t_warmup: float, alpha_i: float) -> float:
    r"""Linear warmup: :math:`\alpha_i + (1 - \alpha_i)\, t / t_w` for :math:`t < t_w`."""
    return alpha_i + (1.0 - alpha_i) * t / t_warmup


def cosine_multiplier(
    t: float, t_warmup: float, t_max: float, alpha_i: float = 0.0, alpha_f: float = 0.1, legacy_neox: bool = False
) -> float:
    r"""``cpt_cosine``: warmup, then cosine decay to ``alpha_f`` at ``t_max``, then flat.

    .. math::
        m(t) = \begin{cases}
          \alpha_i + (1-\alpha_i)\, t/t_w & t < t_w \\
          \alpha_f + \tfrac{1-\alpha_f}{2}\left(1 + \cos\pi\tfrac{t - t_w}{t_{max} - t_w}\right)
            & t_w \le t \le t_{max} \\
          \alpha_f & t > t_{max}
        \end{cases}

    ``legacy_neox`` is GPT-NeoX's cosine before PR #1008 (the papers' runs): after warmup
    :math:`m = \max(\alpha_f, \tfrac12(1 + \cos\pi\, (\min(t, t_{max} - t_w) - t_w) / t_{max}))`: it decays
    toward 0 over the whole of ``t_max`` and is clipped at ``alpha_f``, so it goes flat early (1% warmup over
    131,296 steps reaches 0.1 at step 105,715).
    """
    if t < t_warmup:
        return warmup_multiplier(t, t_warmup, alpha_i)
    if legacy_neox:
        n = min(t, t_max - t_warmup) - t_warmup
        return max(alpha_f, 0.5 * (1.0 + math.cos(math.pi * n / t_max)))
    if t >= t_max:
        return alpha_f
    x = (t - t_warmup) / (t_max - t_warmup)
    return alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + math.cos(math.pi * x))


def constant_multiplier(t: float, t_warmup: float, alpha_i: float = 0.0) -> float:
    r"""``cpt_constant``: optional linear warmup from ``alpha_i``, then :math:`m = 1` (no re-warming)."""
    return warmup_multiplier(t, t_warmup, alpha_i) if t < t_warmup else 1.0


def _inv_sqrt_h(x: float, alpha: float) -> float:
    return 1.0 / math.sqrt(1.0 + alpha * x) - 1.0


def infinite_multiplier(
    t: float,
    t_warmup: float,
    t_cooldown: float,
    alpha_const: float,
    t_anneal: float | None = None,
    t_max: float | None = None,
    alpha_f: float = 0.0,
    alpha_i: float = 0.0,
    cooldown: str = "cosine",
    inv_sqrt_alpha: float = 10.0,
    anneal: str = "exp",
) -> float:
    r"""``cpt_infinite`` (Ibrahim et al. 2024): warmup, cooldown, constant, optional anneal.

    With :math:`c` = ``alpha_const``, :math:`n` the time since the phase began and :math:`T` its length:

    - warmup (:math:`t < t_w`): :math:`\alpha_i + (1-\alpha_i)\, t/t_w`;
    - cooldown (:math:`t_w \le t < t_w + T_{cd}`): cosine :math:`c + \tfrac{1-c}{2}(1 + \cos \pi n/T_{cd})`, or
      inverse-sqrt :math:`1 + (c-1)\, h(n/T_{cd}) / h(1)` with :math:`h(x) = 1/\sqrt{1 + \alpha x} - 1`;
    - constant: :math:`c`, until ``t_anneal`` (forever when it is ``None``);
    - anneal (:math:`t_{an} \le t < t_{max}`): exponential :math:`c\,(\alpha_f / c)^{n/T}` or linear
      :math:`c + (\alpha_f - c)\, n/T`, with :math:`T = t_{max} - t_{an}`; then :math:`\alpha_f`.

    A later task that continues the constant phase without re-warming sets ``t_warmup`` and ``t_cooldown`` to 0.
    """
    if t < t_warmup:
        return warmup_multiplier(t, t_warmup, alpha_i)
    n = t - t_warmup
    if n < t_cooldown:
        x = n / t_cooldown
        if cooldown == "cosine":
            return alpha_const + (1.0 - alpha_const) * 0.5 * (1.0 + math.cos(math.pi * x))
        return 1.0 + (alpha_const - 1.0) * _inv_sqrt_h(x, inv_sqrt_alpha) / _inv_sqrt_h(1.0, inv_sqrt_alpha)
    if t_anneal is None or t < t_anneal:
        return alpha_const
    if t >= t_max:
        return alpha_f
    x = (t - t_anneal) / (t_max - t_anneal)
    if anneal == "exp":
        return alpha_const * (alpha_f / alpha_const) ** x
    return alpha_const + (alpha_f - alpha_const) * x


def wsd_multiplier(
    t: float,
    t_warmup: float,
    t_decay: float,
    t_max: float,
    alpha_f: float = 0.0,
    alpha_i: float = 0.0,
    decay: str = "linear",
) -> float:
    r"""``cpt_wsd``: warmup, stable at 1, then a decay over the last ``t_decay`` that ends at ``t_max``.

    With :math:`x = (t - (t_{max} - t_d)) / t_d` in the decay: linear :math:`1 - (1-\alpha_f)\,x`, cosine
    :math:`\alpha_f + \tfrac{1-\alpha_f}{2}(1 + \cos\pi x)`, 1-sqrt :math:`1 - (1-\alpha_f)\sqrt{x}`; then
    :math:`\alpha_f`.
    """
    if t < t_warmup:
        return warmup_multiplier(t, t_warmup, alpha_i)
    start = t_max - t_decay
    if t < start:
        return 1.0
    if t >= t_max:
        return alpha_f
    x = (t - start) / t_decay
    if decay == "linear":
        return 1.0 - (1.0 - alpha_f) * x
    if decay == "cosine":
        return alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + math.cos(math.pi * x))
    return 1.0 - (1.0 - alpha_f) * math.sqrt(x)


ANNEAL_SHAPES = ("linear", "cosine", "1-sqrt", "exp")


def anneal_multiplier(
    t: float, t_start: float, t_length: float, m_start: float, alpha_f: float = 0.0, shape: str = "linear"
) -> float:
    r"""``cpt_anneal``: a decay branch off a trunk. Flat at the trunk's multiplier :math:`m_0` until
    ``t_start`` (the trunk's batch the branch leaves at), then over ``t_length`` batches to :math:`\alpha_f`.

    With :math:`x = (t - t_s) / t_l` in the decay: linear :math:`\alpha_f + (m_0-\alpha_f)(1 - x)`, cosine
    :math:`\alpha_f + \tfrac{m_0-\alpha_f}{2}(1 + \cos\pi x)`, 1-sqrt :math:`\alpha_f + (m_0-\alpha_f)(1 - \sqrt{x})`,
    exp :math:`m_0 (\alpha_f / m_0)^{x}` (geometric); then :math:`\alpha_f`.
    """
    if t <= t_start:
        return m_start
    if t >= t_start + t_length:
        return alpha_f
    x = (t - t_start) / t_length
    if shape == "linear":
        return alpha_f + (m_start - alpha_f) * (1.0 - x)
    if shape == "cosine":
        return alpha_f + (m_start - alpha_f) * 0.5 * (1.0 + math.cos(math.pi * x))
    if shape == "1-sqrt":
        return alpha_f + (m_start - alpha_f) * (1.0 - math.sqrt(x))
    return m_start * (alpha_f / m_start) ** x if alpha_f > 0 else m_start * (1.0 - x)


# ---- durations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clock:
    """What durations resolve against: the run's length and its tokens per batch."""

    max_duration: str  # e.g. "131296ba" or "297000000000tok"
    tokens_per_batch: int | None = None

    def batches(self, value: str | int | float, name: str) -> float:
        """A duration string (or a bare number of batches) -> batches, as a float."""
        amount, unit = parse_duration(value, name)
        if unit == "dur":
            total, unit = parse_duration(self.max_duration, "max_duration")
            if unit == "dur":
                raise ValueError(f"max_duration={self.max_duration!r} cannot itself be in dur")
            amount *= total
        if unit == "ba":
            return amount
        if not self.tokens_per_batch:
            raise ValueError(f"{name}={value!r} is in tokens: set tokens_per_batch (global batch x seq len)")
        return amount / self.tokens_per_batch


def parse_duration(value: str | int | float, name: str) -> tuple[float, str]:
    """``"0.01dur"`` -> ``(0.01, "dur")``; a bare number is batches. Raises ``ValueError`` naming ``name``.

    A string is a number followed by ``tok``, ``ba`` or ``dur``, as Composer's ``Time.from_timestring`` reads
    it (parsed here so that checking a config does not import Composer)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a duration")
    if isinstance(value, int | float):
        amount, unit = float(value), "ba"
    else:
        text = str(value).strip()
        unit = next((u for u in UNITS if text.endswith(u)), None)
        if unit is None:
            raise ValueError(f"{name}={value!r} has no known unit: use one of {', '.join(UNITS)} (e.g. '500ba')")
        try:
            amount = float(text[: -len(unit)])
        except ValueError as exc:
            raise ValueError(f"{name}={value!r} is not a number followed by a unit") from exc
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{name}={value!r} must be a finite, non-negative duration")
    return amount, unit


def _fraction(name: str, value: float, low: float = 0.0, high: float = 1.0, open_low: bool = False) -> None:
    if not (low < value <= high if open_low else low <= value <= high):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}={value!r} must be in {bracket}{low}, {high}]")


# ---- Composer schedulers -------------------------------------------------------------------------


class Schedule:
    """A Composer scheduler (its ``ComposerScheduler`` protocol: ``scheduler(state, ssr) -> float``).

    Shared machinery: duration parsing, Composer's call convention, phase boundaries."""

    durations: tuple[str, ...] = ()

    def __init__(self, tokens_per_batch: int | None = None, **durations):
        if tokens_per_batch is not None and (not isinstance(tokens_per_batch, int) or tokens_per_batch <= 0):
            raise ValueError(f"tokens_per_batch={tokens_per_batch!r} must be a positive integer")
        self.tokens_per_batch = tokens_per_batch
        for name, value in durations.items():
            if value is not None:
                parse_duration(value, name)  # unit and sign are checked now; order once the run length is known
            setattr(self, name, value)

    def resolve(self, clock: Clock) -> dict[str, float | None]:
        """Every duration in batches, checked against each other. ``ValueError`` names the parameter."""
        out = {n: (None if getattr(self, n) is None else clock.batches(getattr(self, n), n)) for n in self.durations}
        self.check(out)
        return out

    def check(self, d: dict[str, float | None]) -> None:
        raise NotImplementedError

    def multiplier(self, t: float, clock: Clock) -> float:
        raise NotImplementedError

    def phases(self, clock: Clock) -> list[tuple[str, float]]:
        """``[(name, start_batch), ...]`` for the preview."""
        raise NotImplementedError

    def __call__(self, state, ssr: float = 1.0) -> float:
        if ssr != 1.0:
            raise ValueError("cpt schedules do not support scale_schedule_ratio; change max_duration instead")
        clock = Clock(str(state.max_duration), self.tokens_per_batch)
        # Composer calls once at build (for batch 0) and then after batch n, before the clock advances (for n + 1)
        t = int(state.timestamp.batch) + (1 if state.schedulers else 0)
        return self.multiplier(float(t), clock)


class CosineScheduler(Schedule):
    """``cpt_cosine``: see :func:`cosine_multiplier`."""

    durations = ("t_warmup", "t_max")

    def __init__(
        self,
        t_warmup="0.01dur",
        t_max="1dur",
        alpha_i: float = 0.0,
        alpha_f: float = 0.1,
        legacy_neox: bool = False,
        tokens_per_batch: int | None = None,
    ):
        super().__init__(tokens_per_batch, t_warmup=t_warmup, t_max=t_max)
        _fraction("alpha_i", alpha_i)
        _fraction("alpha_f", alpha_f)
        self.alpha_i, self.alpha_f, self.legacy_neox = alpha_i, alpha_f, bool(legacy_neox)

    def check(self, d):
        if d["t_max"] <= 0:
            raise ValueError(f"t_max={self.t_max!r} must be positive")
        if d["t_warmup"] > d["t_max"]:
            raise ValueError(f"t_warmup={self.t_warmup!r} is longer than t_max={self.t_max!r}")

    def multiplier(self, t, clock):
        d = self.resolve(clock)
        return cosine_multiplier(t, d["t_warmup"], d["t_max"], self.alpha_i, self.alpha_f, self.legacy_neox)

    def phases(self, clock):
        d = self.resolve(clock)
        flat = d["t_max"]
        if self.legacy_neox:  # where 0.5 (1 + cos(pi (t - t_w) / t_max)) meets alpha_f
            flat = min(flat, d["t_warmup"] + math.acos(2 * self.alpha_f - 1) / math.pi * d["t_max"])
        return [("warmup", 0.0), ("cosine decay", d["t_warmup"]), ("flat", flat)]


class ConstantScheduler(Schedule):
    """``cpt_constant``: see :func:`constant_multiplier`."""

    durations = ("t_warmup",)

    def __init__(self, t_warmup="0ba", alpha_i: float = 0.0, tokens_per_batch: int | None = None):
        super().__init__(tokens_per_batch, t_warmup=t_warmup)
        _fraction("alpha_i", alpha_i)
        self.alpha_i = alpha_i

    def check(self, d):
        pass

    def multiplier(self, t, clock):
        return constant_multiplier(t, self.resolve(clock)["t_warmup"], self.alpha_i)

    def phases(self, clock):
        return [("warmup", 0.0), ("constant", self.resolve(clock)["t_warmup"])]


class InfiniteScheduler(Schedule):
    """``cpt_infinite``: see :func:`infinite_multiplier`."""

    durations = ("t_warmup", "t_cooldown", "t_anneal", "t_max")

    def __init__(
        self,
        t_warmup="0.01dur",
        t_cooldown="0.4dur",
        alpha_const: float = 0.5,
        t_anneal=None,
        t_max="1dur",
        alpha_f: float = 0.1,
        alpha_i: float = 0.0,
        cooldown: str = "cosine",
        inv_sqrt_alpha: float = 10.0,
        anneal: str = "exp",
        tokens_per_batch: int | None = None,
    ):
        super().__init__(tokens_per_batch, t_warmup=t_warmup, t_cooldown=t_cooldown, t_anneal=t_anneal, t_max=t_max)
        _fraction("alpha_const", alpha_const, open_low=True)
        _fraction("alpha_f", alpha_f)
        _fraction("alpha_i", alpha_i)
        if cooldown not in ("cosine", "inv_sqrt"):
            raise ValueError(f"cooldown={cooldown!r} must be 'cosine' or 'inv_sqrt'")
        if anneal not in ("exp", "linear"):
            raise ValueError(f"anneal={anneal!r} must be 'exp' or 'linear'")
        if inv_sqrt_alpha <= 0:
            raise ValueError(f"inv_sqrt_alpha={inv_sqrt_alpha!r} must be positive")
        if anneal == "exp" and t_anneal is not None and alpha_f <= 0:
            raise ValueError("alpha_f must be positive for an exponential anneal (it decays as (alpha_f/c)^x)")
        if alpha_f > alpha_const:
            raise ValueError(f"alpha_f={alpha_f!r} is above alpha_const={alpha_const!r}: the anneal must go down")
        self.alpha_const, self.alpha_f, self.alpha_i = alpha_const, alpha_f, alpha_i
        self.cooldown, self.inv_sqrt_alpha, self.anneal = cooldown, inv_sqrt_alpha, anneal

    def check(self, d):
        const_start = d["t_warmup"] + d["t_cooldown"]
        if d["t_anneal"] is None:
            return
        if d["t_anneal"] < const_start:
            raise ValueError(f"t_anneal={self.t_anneal!r} starts before warmup + cooldown end")
        if d["t_max"] <= d["t_anneal"]:
            raise ValueError(f"t_max={self.t_max!r} must come after t_anneal={self.t_anneal!r}")

    def multiplier(self, t, clock):
        d = self.resolve(clock)
        return infinite_multiplier(
            t,
            d["t_warmup"],
            d["t_cooldown"],
            self.alpha_const,
            d["t_anneal"],
            d["t_max"],
            self.alpha_f,
            self.alpha_i,
            self.cooldown,
            self.inv_sqrt_alpha,
            self.anneal,
        )

    def phases(self, clock):
        d = self.resolve(clock)
        out = [("warmup", 0.0), ("cooldown", d["t_warmup"]), ("constant", d["t_warmup"] + d["t_cooldown"])]
        if d["t_anneal"] is not None:
            out += [("anneal", d["t_anneal"]), ("flat", d["t_max"])]
        return out


class WSDScheduler(Schedule):
    """``cpt_wsd``: see :func:`wsd_multiplier`."""

    durations = ("t_warmup", "t_decay", "t_max")

    def __init__(
        self,
        t_warmup="0.01dur",
        t_decay="0.2dur",
        t_max="1dur",
        alpha_f: float = 0.0,
        alpha_i: float = 0.0,
        decay: str = "linear",
        tokens_per_batch: int | None = None,
    ):
        super().__init__(tokens_per_batch, t_warmup=t_warmup, t_decay=t_decay, t_max=t_max)
        _fraction("alpha_f", alpha_f)
        _fraction("alpha_i", alpha_i)
        if decay not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"decay={decay!r} must be 'linear', 'cosine' or '1-sqrt'")
        self.alpha_f, self.alpha_i, self.decay = alpha_f, alpha_i, decay

    def check(self, d):
        if d["t_decay"] <= 0:
            raise ValueError(f"t_decay={self.t_decay!r} must be positive")
        if d["t_warmup"] + d["t_decay"] > d["t_max"]:
            raise ValueError(f"t_warmup={self.t_warmup!r} + t_decay={self.t_decay!r} exceed t_max={self.t_max!r}")

    def multiplier(self, t, clock):
        d = self.resolve(clock)
        return wsd_multiplier(t, d["t_warmup"], d["t_decay"], d["t_max"], self.alpha_f, self.alpha_i, self.decay)

    def phases(self, clock):
        d = self.resolve(clock)
        return [("warmup", 0.0), ("stable", d["t_warmup"]), ("decay", d["t_max"] - d["t_decay"]), ("flat", d["t_max"])]


class AnnealScheduler(Schedule):
    """``cpt_anneal``: see :func:`anneal_multiplier`. Written by ``cpt anneal`` for a branch run, whose clock
    continues the trunk's: ``t_start`` is the trunk's batch, ``m_start`` its multiplier there."""

    durations = ("t_start", "t_length")

    def __init__(
        self,
        t_start="0ba",
        t_length="1ba",
        m_start: float = 1.0,
        alpha_f: float = 0.0,
        shape: str = "linear",
        tokens_per_batch: int | None = None,
    ):
        super().__init__(tokens_per_batch, t_start=t_start, t_length=t_length)
        _fraction("m_start", m_start, open_low=True)
        _fraction("alpha_f", alpha_f)
        if shape not in ANNEAL_SHAPES:
            raise ValueError(f"shape={shape!r} must be one of {', '.join(ANNEAL_SHAPES)}")
        if alpha_f > m_start:
            raise ValueError(f"alpha_f={alpha_f!r} is above m_start={m_start!r}: an anneal decays")
        self.m_start, self.alpha_f, self.shape = m_start, alpha_f, shape

    def check(self, d):
        if d["t_length"] <= 0:
            raise ValueError(f"t_length={self.t_length!r} must be positive")

    def multiplier(self, t, clock):
        d = self.resolve(clock)
        return anneal_multiplier(t, d["t_start"], d["t_length"], self.m_start, self.alpha_f, self.shape)

    def phases(self, clock):
        d = self.resolve(clock)
        return [("trunk", 0.0), ("anneal", d["t_start"]), ("flat", d["t_start"] + d["t_length"])]


SCHEDULERS = {
    "cpt_cosine": CosineScheduler,
    "cpt_constant": ConstantScheduler,
    "cpt_infinite": InfiniteScheduler,
    "cpt_wsd": WSDScheduler,
    "cpt_anneal": AnnealScheduler,
}


def make_scheduler(name: str, **kwargs) -> Schedule:
    """A scheduler by its registered name; unknown names and parameters raise ``ValueError``."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler.name={name!r} is not one of {sorted(SCHEDULERS)}")
    try:
        return SCHEDULERS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"scheduler {name}: {exc}") from exc
