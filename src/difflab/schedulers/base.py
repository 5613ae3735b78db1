"""What every scheduler shares: its config, the float64 schedule tables, saving/loading, add_noise.

A scheduler is built from diffusers' constructor keywords (``DDIMScheduler(beta_schedule=...,
prediction_type=...)``); they are validated into one typed, keyword-only dataclass per scheduler
(``config_class``) and exposed as a plain dict in ``scheduler.config``. ``save_config(folder)``
writes ``scheduler_config.json`` in diffusers' format and ``from_pretrained(folder)`` reads it
back (also diffusers' own files).

Subclasses implement ``set_timesteps`` and ``step``; everything else lives here so that the
algorithm files differ only where the algorithms differ.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from difflab.config import Config, check_choice, check_positive
from difflab.errors import ConfigError
from difflab.io import atomic_write_json, read_json
from difflab.schedulers import schedules
from difflab.schedulers._common import append_dims, threshold_sample

CONFIG_NAME = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class SchedulerOutput:
    """Result of one ``step``: x_{t−1} and the model's estimate x̂₀ of the clean sample."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None

    def __getitem__(self, i: int) -> Tensor | None:  # diffusers-style ``out[0]``
        return (self.prev_sample, self.pred_original_sample)[i]


@dataclass(kw_only=True)
class SchedulerConfig(Config):
    """Keys common to all schedulers (same names and meanings as diffusers)."""

    num_train_timesteps: int = 1000  # T, the length of the training chain
    beta_start: float = 0.0001  # β at t = 0 (linear, scaled_linear, sigmoid)
    beta_end: float = 0.02  # β at t = T−1
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
    trained_betas: list[float] | None = None  # an explicit β table; overrides the four above
    prediction_type: str = "epsilon"  # what the network predicts: epsilon | v_prediction | sample
    timestep_spacing: str = "leading"  # where the inference steps sit (Lin et al. 2023, Table 2)
    steps_offset: int = 0  # added to "leading" timesteps (Stable Diffusion v1 uses 1)

    def validate(self) -> None:
        owner = type(self).__name__
        for name in ("num_train_timesteps", "steps_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{owner}.{name}={value!r} must be an integer")
        check_positive(owner, "num_train_timesteps", self.num_train_timesteps)
        check_choice(owner, "beta_schedule", self.beta_schedule, schedules.BETA_SCHEDULES)
        check_choice(owner, "prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice(owner, "timestep_spacing", self.timestep_spacing,
                     schedules.TIMESTEP_SPACINGS)
        check_positive(owner, "steps_offset", self.steps_offset, allow_zero=True)
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ConfigError(f"{owner}.trained_betas has {len(self.trained_betas)} entries but "
                              f"num_train_timesteps={self.num_train_timesteps}")


class ConfigDict(dict):
    """A plain dict (JSON, ``**``, ``==``) whose keys also read as attributes, like diffusers'
    ``FrozenDict``: ``scheduler.config.num_train_timesteps`` in diffusers' training scripts."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None


def _extensions_of(class_name: Any) -> frozenset[str]:
    """The difflab-only keys of the scheduler class named ``class_name`` (none if unknown)."""
    from difflab.schedulers import SCHEDULERS  # the one registry; late import: no cycle

    by_name = {c.__name__: c for c in SCHEDULERS.values()}
    return by_name[class_name].extensions if class_name in by_name else frozenset()


class Scheduler:
    """Base class of the seven schedulers; see the module docstring.

    Attributes (float64, on the CPU): ``betas`` β_t, ``alphas`` α_t, ``alphas_cumprod`` ᾱ_t,
    each of shape ``(num_train_timesteps,)``. After ``set_timesteps(n)``: ``timesteps`` (the
    values to feed the model, in order) and ``num_inference_steps``.
    """

    config_class: ClassVar[type[SchedulerConfig]] = SchedulerConfig
    # diffusers keys that difflab does not implement: accepted (so diffusers' config files load)
    # only at these default values — or any of a frozenset of values that change nothing
    # here —; any other value is a ConfigError, never silently ignored.
    unsupported: ClassVar[dict[str, Any]] = {}
    # difflab keys that diffusers' class of the same name lacks (its loader ignores them)
    extensions: ClassVar[frozenset[str]] = frozenset()
    order: ClassVar[int] = 1  # model evaluations per step (Heun: 2)
    init_noise_sigma: float = 1.0  # std of the initial x_T

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                    annotation=f.type)
                  for f in dataclasses.fields(cls.config_class)]
        cls.__signature__ = inspect.Signature(params)  # help() shows the real keywords

    def __init__(self, **config: Any) -> None:
        for key, default in self.unsupported.items():
            allowed = default if isinstance(default, frozenset) else {default}
            value = config.pop(key, default)
            if default is not value and not any(value == a for a in allowed):
                raise ConfigError(f"{type(self).__name__}.{key}={value!r} is not implemented in "
                                  f"difflab; allowed: "
                                  f"{' | '.join(sorted(map(repr, allowed)))}")
        if isinstance(config.get("trained_betas"), (np.ndarray, Tensor)):
            config["trained_betas"] = config["trained_betas"].tolist()
        self.cfg = self.config_class.from_dict(config)
        self._given = frozenset(config)  # the keys set by the caller, not left at defaults
        cfg = self.cfg
        if cfg.trained_betas is not None:
            betas = torch.tensor(cfg.trained_betas, dtype=torch.float64)
        else:
            betas = schedules.make_betas(cfg.beta_schedule, cfg.num_train_timesteps,
                                         cfg.beta_start, cfg.beta_end)
        if getattr(cfg, "rescale_betas_zero_snr", False):
            betas = schedules.rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = schedules.alphas_cumprod(betas)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ------------------------------------------------------------------------------ config

    @property
    def config(self) -> dict[str, Any]:
        """The constructor keywords as a dict (a copy; keys also read as attributes), with
        diffusers' two private keys:
        ``_class_name`` and ``_use_default_values`` (the keys the caller left at this class's
        defaults, which :meth:`from_config` of another class leaves at *its* defaults)."""
        values = self.cfg.to_dict()
        return ConfigDict({"_class_name": type(self).__name__, **values,
                           "_use_default_values": sorted(set(values) - self._given)})

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> Scheduler:
        """Build from a config dict (ours or diffusers'), e.g. another scheduler's ``.config``.

        As in diffusers, so that schedulers can be swapped (``Euler.from_config(ddim.config)``):
        keys this scheduler does not have (private ``_`` keys, another scheduler's options) are
        dropped, and so are the keys listed in ``_use_default_values`` (left at the other
        class's defaults: this class keeps its own, e.g. Euler's ``linspace`` grid rather than
        DDIM's ``leading``). difflab's :attr:`extensions` (keys diffusers' class of the same
        name lacks) are read only from a config of this very class (``_class_name``); pass
        them as ``overrides`` otherwise — so ``clip_sample=True`` in a DDPM config never turns
        on Euler's x̂₀ clipping, as it would not in diffusers. ``overrides`` are checked
        strictly (an unknown keyword is a ConfigError).
        """
        known = {f.name for f in dataclasses.fields(cls.config_class)} | set(cls.unsupported)
        source = config.get("_class_name")
        dropped = set(config.get("_use_default_values") or ())
        if source != cls.__name__:
            dropped |= cls.extensions | _extensions_of(source)
        kept = {k: v for k, v in config.items() if k in known and k not in dropped}
        return cls(**{**kept, **overrides})

    def save_config(self, folder: str | Path) -> Path:
        """Write ``folder/scheduler_config.json`` (diffusers' format: ``_class_name`` + keys)."""
        path = Path(folder) / CONFIG_NAME
        config = self.config
        del config["_use_default_values"]  # a file's keys are all given, as in diffusers
        atomic_write_json(path, config)
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path, subfolder: str | None = None) -> Scheduler:
        """Load ``folder[/subfolder]/scheduler_config.json``.

        Called on a concrete class it builds that class from the file (like diffusers); called
        on :class:`Scheduler` it builds the class named by ``_class_name``.
        """
        path = Path(folder) / (subfolder or "") / CONFIG_NAME
        config = dict(read_json(path))
        target = cls
        if cls is Scheduler:
            from difflab.schedulers import SCHEDULERS  # the one registry; late import: no cycle

            by_name = {c.__name__: c for c in SCHEDULERS.values()}
            name = config.get("_class_name")
            if name not in by_name:
                raise ConfigError(f"{path}: _class_name={name!r} is not a difflab scheduler; "
                                  f"choose one of {sorted(by_name)}")
            target = by_name[name]
        return target.from_config(config)

    def __repr__(self) -> str:
        default = self.config_class().to_dict()
        changed = ", ".join(f"{k}={v!r}" for k, v in self.cfg.to_dict().items()
                            if default[k] != v)
        return f"{type(self).__name__}({changed})"

    def __len__(self) -> int:
        return self.cfg.num_train_timesteps

    # ------------------------------------------------------------------ inference grid

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None
                      ) -> None:
        """Choose ``num_inference_steps`` integer timesteps by ``timestep_spacing``."""
        self._check_steps(num_inference_steps)
        T = self.cfg.num_train_timesteps
        ts = schedules.spaced_timesteps(self.cfg.timestep_spacing, T, num_inference_steps,
                                        self.cfg.steps_offset)
        self.timesteps = torch.from_numpy(np.round(ts).astype(np.int64)).to(device)
        self.num_inference_steps = num_inference_steps
        self._reset_steps()

    def _check_steps(self, n: Any) -> None:
        """1 ≤ n ≤ T for every sampler: more steps than trained timesteps would repeat
        timesteps or, on some grids, give NaN (diffusers lets the σ-space ones through)."""
        T = self.cfg.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= T:
            raise ConfigError(f"num_inference_steps={n!r} must be an integer in [1, {T}] (the "
                              "model's trained timesteps)")

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The network's input at this step; the identity for schedulers working on x_t."""
        return sample

    # ------------------------------------------------------------------- forward process

    def _alpha_sigma(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """VP coefficients (√ᾱ_t, √(1 − ᾱ_t)) of each timestep, float64 ``(B,)``."""
        ab = self.alphas_cumprod[timesteps.cpu().long()]
        return ab.sqrt(), (1.0 - ab).sqrt()

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward process q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε.

        ``original_samples, noise: (B, ...)``, ``timesteps: (B,)``.
        """
        return schedules.add_noise(original_samples, noise, timesteps, self.alphas_cumprod)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, §4).

        ``sample`` is x_0; uses the same noise level as :meth:`add_noise` for ``timesteps``.
        """
        alpha, sigma = self._alpha_sigma(torch.as_tensor(timesteps).reshape(-1))
        alpha = append_dims(alpha.to(sample.device, sample.dtype), sample.ndim)
        sigma = append_dims(sigma.to(sample.device, sample.dtype), sample.ndim)
        return alpha * noise - sigma * sample

    # --------------------------------------------------------------------- shared math

    def _pred_x0_vp(self, model_output: Tensor, sample: Tensor, alpha: float,
                    sigma: float) -> Tensor:
        """x̂₀ from the model output for x_t = α x_0 + σ ε (VP form, α = √ᾱ_t, σ = √(1 − ᾱ_t))."""
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            return (sample - sigma * model_output) / alpha
        if kind == "v_prediction":
            return alpha * sample - sigma * model_output
        return model_output

    def _clip_x0(self, x0: Tensor) -> Tensor:
        """Dynamic thresholding or plain clipping of x̂₀, where the scheduler has those options."""
        cfg = self.cfg
        if getattr(cfg, "thresholding", False):
            return threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if getattr(cfg, "clip_sample", False):
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) "
                               "before step()")

    # ------------------------------------------------ step counter (multistep schedulers)

    @property
    def step_index(self) -> int | None:
        """Index of the current step in ``timesteps`` (None until the first call)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the loop at ``timesteps[begin_index]`` (img2img: skip the first steps)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | Tensor,
                           schedule_timesteps: Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule.

        A repeated value (Heun's doubled timesteps) resolves to its second occurrence, the
        first-order stage of that step, as in diffusers; but the first timestep of the schedule
        is always index 0, so a loop that starts at the beginning never skips a step.
        """
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep).to(schedule.device)
        matches = (schedule == timestep).nonzero().flatten()
        if len(matches) == 0:
            raise ValueError(f"{type(self).__name__}: timestep {float(timestep)} is not in the "
                             f"current schedule; pass one of scheduler.timesteps")
        if matches[0] == 0:
            return 0
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _init_step_index(self, timestep: float | Tensor) -> None:
        self._step_index = (self._begin_index if self._begin_index is not None
                            else self.index_for_timestep(timestep))

    def _schedule_indices(self, timesteps: Tensor) -> list[int]:
        """Schedule positions used by ``add_noise`` (img2img conventions of diffusers)."""
        if self._begin_index is None:
            schedule = self.timesteps.cpu()
            return [self.index_for_timestep(t, schedule) for t in timesteps.reshape(-1).cpu()]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.reshape(-1).shape[0]

    def _reset_steps(self) -> None:
        self._step_index = None
        self._begin_index = None
