"""The schedules as llm-foundry's registry takes them (``pyproject.toml``'s ``llmfoundry_schedulers``).

The registry accepts only subclasses of Composer's ``ComposerScheduler``, and importing Composer takes seconds;
``cpt.optim.schedules`` stays free of it, so that checking or previewing a config does not pay that. Each class
here is the schedule itself with Composer's protocol as a second base: no behaviour of its own."""

from __future__ import annotations

from composer.optim import ComposerScheduler

from cpt.optim import schedules


class CosineScheduler(schedules.CosineScheduler, ComposerScheduler):
    KEY = "cpt_cosine"


class ConstantScheduler(schedules.ConstantScheduler, ComposerScheduler):
    KEY = "cpt_constant"


class InfiniteScheduler(schedules.InfiniteScheduler, ComposerScheduler):
    KEY = "cpt_infinite"


class WSDScheduler(schedules.WSDScheduler, ComposerScheduler):
    KEY = "cpt_wsd"


class AnnealScheduler(schedules.AnnealScheduler, ComposerScheduler):
    KEY = "cpt_anneal"
