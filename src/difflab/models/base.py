"""Saving and loading models as checkpoint folders: ``config.json`` + ``model.safetensors``.

Every difflab model class has a ``config_class`` (a :class:`~difflab.config.Config` dataclass),
is built as ``Model(config)``, and is registered by name in :data:`MODEL_REGISTRY` (the one
explicit name → class map; see ``difflab.models.__init__``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from difflab.config import Config
from difflab.errors import CheckpointError, a_or_an
from difflab.io import (
    atomic_write_json,
    load_state_dict_into,
    load_tensors,
    read_json,
    replace_dir,
    save_tensors,
)

MODEL_REGISTRY: dict[str, type[ModelMixin]] = {}


class ModelMixin(nn.Module):
    """Base class of difflab models: a typed config and save/load as a checkpoint folder."""

    config_class: ClassVar[type[Config]]
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            MODEL_REGISTRY[cls.__name__] = cls

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder: str | Path,
                        extra_files: dict[str, Any] | None = None) -> None:
        """Write ``folder/config.json`` and ``folder/model.safetensors`` atomically.

        ``extra_files`` maps file names to JSON-serialisable objects written beside them.
        The folder is assembled under a temporary name, then renamed into place.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        cfg = {"_class_name": type(self).__name__, **self.config.to_dict()}
        atomic_write_json(tmp / "config.json", cfg)
        save_tensors(tmp / "model.safetensors", self.state_dict())
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        if folder.exists():  # keep files we do not own (reports, samples) in place
            for p in folder.iterdir():
                if not (tmp / p.name).exists() and not p.name.startswith("."):
                    p.rename(tmp / p.name)
        replace_dir(tmp, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> Any:
        """Build the model from ``folder/config.json`` and load ``model.safetensors``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: checkpoint folder not found")
        cfg = read_json(folder / "config.json")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{folder}/config.json: expected a JSON object, got "
                                  f"{type(cfg).__name__}")
        cfg = dict(cfg)
        name = cfg.pop("_class_name", cls.__name__)
        target = MODEL_REGISTRY.get(name)
        if target is None:
            raise CheckpointError(f"{folder}/config.json: unknown model class {name!r}; "
                                  f"known: {sorted(MODEL_REGISTRY)}")
        if cls is not ModelMixin and not issubclass(target, cls):
            raise CheckpointError(f"{folder}: holds {a_or_an(name)}, not "
                                  f"{a_or_an(cls.__name__)}")
        model = target(target.config_class.from_dict(cfg))
        state = load_tensors(folder / "model.safetensors")
        load_state_dict_into(model, state, str(folder / "model.safetensors"))
        return model.to(map_location)


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load any registered difflab model from a checkpoint folder."""
    import difflab.models  # noqa: F401  (registers every model class)

    return ModelMixin.from_pretrained(folder, map_location)
