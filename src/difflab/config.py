"""Typed, JSON round-trippable configuration dataclasses.

Every component has one ``@dataclass(kw_only=True)`` config deriving from :class:`Config`.
``to_dict``/``from_dict`` round-trip through JSON; unknown keys and wrong types are
:class:`~difflab.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from difflab.errors import ConfigError

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for dataclass configs: JSON round trip and validation hooks."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` for invalid values. Subclasses extend this."""

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            hint = hints.get(k)
            if hint is not None and not _matches(v, hint):
                shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
                raise ConfigError(f"{cls.__name__}.{k}={shown} has the wrong type; expected "
                                  f"{_hint_name(hint)}")
            if isinstance(v, list) and _is_tuple_hint(hint):
                v = tuple(v)
            kwargs[k] = v
        try:
            return cls(**kwargs)
        except TypeError as e:  # missing required field
            raise ConfigError(f"{cls.__name__}: {e}") from None

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except (UnicodeDecodeError, IsADirectoryError) as e:
            raise ConfigError(f"{path}: not a JSON text file ({type(e).__name__})") from None
        return cls.from_dict(d)


def _is_tuple_hint(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple


def _matches(v: Any, hint: Any) -> bool:
    """Whether the JSON value ``v`` fits the type ``hint`` (int, float, bool, str, None, unions,
    tuple[...] and list[...] of those; JSON arrays stand for tuples). Other hints accept all."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return v is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in args)
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is str:
        return isinstance(v, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(v, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(v) == len(args) and all(_matches(x, a) for x, a in zip(v, args))
        return all(_matches(x, args[0]) for x in v)
    return True


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_choice(owner: str, name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed; choose one of {allowed}")


def check_positive(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number > 0 (or >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and (value >= 0 if allow_zero else value > 0) and value != float("inf")
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{owner}.{name}={value!r} must be a finite number {bound}")
