"""Schedules: a table at every phase boundary, computed by hand here, and the units they accept."""

from __future__ import annotations

import math

import pytest

from cpt.optim import schedules

PI = math.pi


def cos_decay(x, floor):  # the textbook half-cosine, written independently of the module
    return floor + (1 - floor) * (1 + math.cos(PI * x)) / 2


# t_warmup=10, t_max=110, alpha_f=0.1
COSINE = [
    pytest.param(0, 0.0, id="step0-from-zero"),
    pytest.param(1, 0.1, id="step1"),
    pytest.param(9, 0.9, id="last-warmup-step"),
    pytest.param(10, 1.0, id="peak"),
    pytest.param(60, 0.55, id="midpoint"),  # 0.1 + 0.9 * 0.5
    pytest.param(35, 0.1 + 0.9 * (1 + math.cos(PI / 4)) / 2, id="quarter"),
    pytest.param(110, 0.1, id="t_max"),
    pytest.param(500, 0.1, id="past-t_max"),
]


@pytest.mark.parametrize("t,expected", COSINE)
def test_cosine_table(t, expected):
    assert schedules.cosine_multiplier(t, 10, 110, 0.0, 0.1) == pytest.approx(expected, abs=1e-12)


def test_cosine_alpha_i_and_no_warmup():
    assert schedules.cosine_multiplier(0, 10, 110, alpha_i=0.5, alpha_f=0.1) == 0.5
    assert schedules.cosine_multiplier(5, 10, 110, alpha_i=0.5, alpha_f=0.1) == pytest.approx(0.75)
    assert schedules.cosine_multiplier(0, 0, 100, alpha_f=0.1) == 1.0
    assert schedules.cosine_multiplier(50, 0, 100, alpha_f=0.0) == pytest.approx(0.5)


def test_legacy_neox_goes_flat_near_105_7k():
    total, warm = 131_296, 1312.96
    # 0.5 (1 + cos(pi x)) = 0.1  <=>  x = arccos(-0.8) / pi; x is measured over the whole of t_max
    floor_step = warm + math.acos(-0.8) / PI * total
    assert 105_700 < floor_step < 105_730
    m = lambda t: schedules.cosine_multiplier(t, warm, total, 0.0, 0.1, legacy_neox=True)  # noqa: E731
    assert m(warm) == pytest.approx(1.0)
    assert m(floor_step - 200) > 0.1 + 1e-4
    assert m(floor_step + 1) == 0.1
    assert m(120_000) == 0.1 and m(200_000) == 0.1
    # the standard cosine is still above the floor there
    assert schedules.cosine_multiplier(floor_step, warm, total, 0.0, 0.1) > 0.1 + 0.01


@pytest.mark.parametrize("t,warm,expected", [(0, 0, 1.0), (0, 4, 0.0), (3, 4, 0.75), (4, 4, 1.0), (10**6, 4, 1.0)])
def test_constant_table(t, warm, expected):
    assert schedules.constant_multiplier(t, warm) == pytest.approx(expected)


def h(x, a=10.0):
    return 1 / math.sqrt(1 + a * x) - 1


# t_warmup=10, t_cooldown=40 (ends at 50), c=0.5, anneal 100 -> 200, alpha_f=0.05
INFINITE = [
    pytest.param(0, "cosine", "exp", 0.0, id="step0"),
    pytest.param(9, "cosine", "exp", 0.9, id="last-warmup-step"),
    pytest.param(10, "cosine", "exp", 1.0, id="peak=cooldown-start"),
    pytest.param(30, "cosine", "exp", 0.75, id="cooldown-mid-cosine"),  # 0.5 + 0.5 * 0.5
    pytest.param(30, "inv_sqrt", "exp", 1 + (0.5 - 1) * h(0.5) / h(1.0), id="cooldown-mid-inv-sqrt"),
    pytest.param(50, "cosine", "exp", 0.5, id="constant-start"),
    pytest.param(50, "inv_sqrt", "exp", 0.5, id="constant-start-inv-sqrt"),
    pytest.param(99, "cosine", "exp", 0.5, id="constant-end"),
    pytest.param(100, "cosine", "exp", 0.5, id="anneal-start"),
    pytest.param(150, "cosine", "exp", 0.5 * (0.05 / 0.5) ** 0.5, id="anneal-mid-exp"),
    pytest.param(150, "cosine", "linear", 0.275, id="anneal-mid-linear"),
    pytest.param(200, "cosine", "exp", 0.05, id="t_max"),
    pytest.param(900, "cosine", "linear", 0.05, id="past-t_max"),
]


@pytest.mark.parametrize("t,cooldown,anneal,expected", INFINITE)
def test_infinite_table(t, cooldown, anneal, expected):
    got = schedules.infinite_multiplier(t, 10, 40, 0.5, 100, 200, 0.05, cooldown=cooldown, anneal=anneal)
    assert got == pytest.approx(expected, abs=1e-12)


def test_infinite_without_anneal_stays_constant_and_continues_without_rewarming():
    assert schedules.infinite_multiplier(10**9, 10, 40, 0.5) == 0.5
    # a later task continues the constant phase: no warmup, no cooldown
    assert schedules.infinite_multiplier(0, 0, 0, 0.5) == 0.5


# t_warmup=10, t_decay=20, t_max=100 (decay starts at 80), alpha_f=0.0
WSD = [
    pytest.param(0, "linear", 0.0, id="step0"),
    pytest.param(10, "linear", 1.0, id="peak"),
    pytest.param(79, "linear", 1.0, id="stable-end"),
    pytest.param(80, "linear", 1.0, id="decay-start"),
    pytest.param(85, "linear", 0.75, id="decay-quarter-linear"),
    pytest.param(85, "cosine", (1 + math.cos(PI / 4)) / 2, id="decay-quarter-cosine"),
    pytest.param(85, "1-sqrt", 0.5, id="decay-quarter-1-sqrt"),
    pytest.param(100, "1-sqrt", 0.0, id="t_max"),
    pytest.param(150, "cosine", 0.0, id="past-t_max"),
]


@pytest.mark.parametrize("t,decay,expected", WSD)
def test_wsd_table(t, decay, expected):
    assert schedules.wsd_multiplier(t, 10, 20, 100, 0.0, decay=decay) == pytest.approx(expected, abs=1e-12)


# anneal branch: leaves the trunk at batch 100 with multiplier 0.5, decays over 40 batches to 0.05
ANNEAL = [
    pytest.param(0, "linear", 0.5, id="trunk"),
    pytest.param(100, "linear", 0.5, id="branch-start"),
    pytest.param(110, "linear", 0.05 + 0.45 * 0.75, id="quarter-linear"),
    pytest.param(110, "cosine", 0.05 + 0.45 * (1 + math.cos(PI / 4)) / 2, id="quarter-cosine"),
    pytest.param(110, "1-sqrt", 0.05 + 0.45 * 0.5, id="quarter-1-sqrt"),
    pytest.param(110, "exp", 0.5 * 0.1**0.25, id="quarter-exp"),
    pytest.param(120, "exp", 0.5 * 0.1**0.5, id="half-exp"),
    pytest.param(140, "cosine", 0.05, id="end"),
    pytest.param(170, "exp", 0.05, id="past-end"),
]


@pytest.mark.parametrize("t,shape,expected", ANNEAL)
def test_anneal_table(t, shape, expected):
    assert schedules.anneal_multiplier(t, 100, 40, 0.5, 0.05, shape=shape) == pytest.approx(expected, abs=1e-12)
    sched = schedules.AnnealScheduler(t_start="100ba", t_length="40ba", m_start=0.5, alpha_f=0.05, shape=shape)
    assert sched.multiplier(t, schedules.Clock("140ba")) == pytest.approx(expected, abs=1e-12)


# ---- units ----------------------------------------------------------------------------------------

TPB = 1000  # tokens per batch


@pytest.mark.parametrize(
    "value,max_duration,tpb,expected",
    [
        ("50ba", "1000ba", None, 50.0),
        ("50ba", "1000000tok", TPB, 50.0),
        ("50000tok", "1000ba", TPB, 50.0),
        ("50000tok", "1000000tok", TPB, 50.0),
        ("0.05dur", "1000ba", None, 50.0),
        ("0.05dur", "1000000tok", TPB, 50.0),
        ("1_000tok", "10ba", TPB, 1.0),
        (50, "1000ba", None, 50.0),
        ("0ba", "1000ba", None, 0.0),
    ],
)
def test_units_that_work(value, max_duration, tpb, expected):
    assert schedules.Clock(max_duration, tpb).batches(value, "t_warmup") == pytest.approx(expected)


@pytest.mark.parametrize(
    "value,max_duration,tpb,match",
    [
        ("50000tok", "1000ba", None, "t_warmup='50000tok' is in tokens: set tokens_per_batch"),
        ("0.05dur", "1000000tok", None, "t_warmup='0.05dur' is in tokens: set tokens_per_batch"),
        ("5ep", "1000ba", None, "t_warmup='5ep' has no known unit"),
        ("100sp", "1000ba", None, "t_warmup='100sp' has no known unit"),
        ("10s", "1000ba", None, "t_warmup='10s' has no known unit"),
        ("abcba", "1000ba", None, "t_warmup='abcba' is not a number"),
        ("-5ba", "1000ba", None, "t_warmup='-5ba' must be a finite, non-negative"),
        ("0.1dur", "1ep", None, "max_duration='1ep' has no known unit"),
        ("0.1dur", "1dur", None, "max_duration='1dur' cannot itself be in dur"),
    ],
)
def test_units_that_raise(value, max_duration, tpb, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        schedules.Clock(max_duration, tpb).batches(value, "t_warmup")


def test_every_unit_combination_for_cosine():
    """Every pairing of units for (t_warmup, t_max, max_duration) with and without tokens_per_batch."""
    values = {"ba": ("10ba", "110ba"), "tok": ("10000tok", "110000tok"), "dur": ("0.1dur", "1.1dur")}
    for wu, (w, _) in values.items():
        for mu, (_, m) in values.items():
            for max_duration in ("100ba", "100000tok"):
                for tpb in (None, TPB):
                    sched = schedules.CosineScheduler(t_warmup=w, t_max=m, tokens_per_batch=tpb)
                    needs_tpb = "tok" in (wu, mu) or ("dur" in (wu, mu) and max_duration.endswith("tok"))
                    clock = schedules.Clock(max_duration, tpb)
                    if needs_tpb and tpb is None:
                        with pytest.raises(ValueError, match="tokens_per_batch"):
                            sched.multiplier(0, clock)
                        continue
                    # every spelling means warmup 10 batches, t_max 110 batches
                    assert sched.multiplier(5, clock) == pytest.approx(0.5), (w, m, max_duration, tpb)
                    assert sched.multiplier(60, clock) == pytest.approx(0.55), (w, m, max_duration, tpb)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("cpt_cosine", {"t_warmup": "200ba", "t_max": "100ba"}, "t_warmup='200ba' is longer than t_max"),
        ("cpt_cosine", {"t_max": "0ba"}, "t_max='0ba' must be positive"),
        ("cpt_cosine", {"alpha_f": 1.5}, "alpha_f=1.5 must be in"),
        ("cpt_cosine", {"t_warmup": "-1ba"}, "t_warmup='-1ba' must be a finite"),
        ("cpt_cosine", {"t_warmup": "1ep"}, "t_warmup='1ep' has no known unit"),
        ("cpt_cosine", {"tokens_per_batch": 0}, "tokens_per_batch=0 must be a positive"),
        ("cpt_cosine", {"warmup": "1ba"}, "unexpected keyword argument 'warmup'"),
        (
            "cpt_infinite",
            {"t_anneal": "10ba", "t_warmup": "10ba", "t_cooldown": "20ba"},
            "t_anneal='10ba' starts before warmup \\+ cooldown end",
        ),
        (
            "cpt_infinite",
            {"t_anneal": "100ba", "t_max": "100ba", "t_warmup": "0ba", "t_cooldown": "0ba"},
            "t_max='100ba' must come after t_anneal",
        ),
        ("cpt_infinite", {"alpha_const": 0.0}, "alpha_const=0.0 must be in \\(0"),
        ("cpt_infinite", {"alpha_const": 0.3, "alpha_f": 0.5}, "alpha_f=0.5 is above alpha_const"),
        ("cpt_infinite", {"t_anneal": "0.8dur", "alpha_f": 0.0}, "alpha_f must be positive for an exponential"),
        ("cpt_infinite", {"cooldown": "linear"}, "cooldown='linear' must be"),
        ("cpt_wsd", {"t_decay": "0.7dur", "t_warmup": "0.5dur"}, "exceed t_max"),
        ("cpt_wsd", {"t_decay": "0ba"}, "t_decay='0ba' must be positive"),
        ("cpt_wsd", {"decay": "sqrt"}, "decay='sqrt' must be"),
        ("cpt_nope", {}, "scheduler.name='cpt_nope' is not one of"),
    ],
)
def test_impossible_parameters_name_the_parameter(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.make_scheduler(name, **kwargs).resolve(schedules.Clock("1000ba"))


def test_registered_with_llmfoundry():
    """llm-foundry finds each schedule under its name, as Composer's protocol subclass of cpt's own class."""
    from composer.optim import ComposerScheduler
    from llmfoundry import registry

    for name, cls in schedules.SCHEDULERS.items():
        found = registry.schedulers.get(name)
        assert issubclass(found, cls) and issubclass(found, ComposerScheduler) and found.__mro__[1] is cls
