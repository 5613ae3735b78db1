"""difflab: VAEs and diffusion models, from scratch.

The seven schedulers are importable from here as well as from :mod:`difflab.schedulers`
(``from difflab import DDIMScheduler``); they are loaded on first use so that ``import difflab``
and ``difflab --help`` stay fast.
"""

from typing import Any

__version__ = "0.1.0"

_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
               "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
               "DPMSolverMultistepScheduler", "SCHEDULERS", "get_scheduler")

__all__ = ["__version__", *_SCHEDULERS]


def __getattr__(name: str) -> Any:
    if name in _SCHEDULERS:
        from difflab import schedulers

        return getattr(schedulers, name)
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
