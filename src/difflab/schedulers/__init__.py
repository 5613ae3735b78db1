"""Noise schedules and samplers with diffusers' interface and numbers.

``SCHEDULERS`` is the one name → class registry (``get_scheduler("ddim", ...)``); every class is
also importable directly. See :mod:`difflab.schedulers.base` for the shared interface.
"""

from __future__ import annotations

from typing import Any

from difflab.errors import ConfigError
from difflab.schedulers.base import Scheduler, SchedulerConfig, SchedulerOutput
from difflab.schedulers.ddim import DDIMScheduler
from difflab.schedulers.ddpm import DDPMScheduler
from difflab.schedulers.dpmsolver import DPMSolverMultistepScheduler
from difflab.schedulers.euler import EulerDiscreteScheduler
from difflab.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from difflab.schedulers.heun import HeunDiscreteScheduler
from difflab.schedulers.lms import LMSDiscreteScheduler
from difflab.schedulers.sigma_base import SigmaScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}


def get_scheduler(name: str, **config: Any) -> Scheduler:
    """Build the scheduler registered as ``name`` with diffusers-style keyword config."""
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler={name!r} is not allowed; choose one of {list(SCHEDULERS)}")
    return SCHEDULERS[name](**config)


__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SigmaScheduler",
    "get_scheduler",
]
