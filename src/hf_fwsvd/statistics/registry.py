"""The registry of calibration statistics: name -> [`Statistic`] instance."""

from __future__ import annotations

from typing import TypeVar

from .base import Statistic

__all__ = ["available_statistics", "get_statistic", "register_statistic"]

_STATISTICS: dict[str, Statistic] = {}

StatisticClass = TypeVar("StatisticClass", bound=type)


def register_statistic(cls: StatisticClass) -> StatisticClass:
    """Register a [`Statistic`] subclass under its `name` (usable as a class decorator).

    Raises:
        `TypeError`: When `cls` is not a `Statistic` subclass.
        `ValueError`: When its `name` or `per` is malformed, or another class already holds the name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Statistic)):
        raise TypeError(f"register_statistic() takes a Statistic subclass, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__qualname__} must set `name` to a Python identifier, got {name!r}.")
    if cls.per not in ("example", "token"):
        raise ValueError(f"{cls.__qualname__}.per must be 'example' or 'token', got {cls.per!r}.")
    existing = _STATISTICS.get(name)
    if existing is not None and type(existing).__qualname__ != cls.__qualname__:
        raise ValueError(f"Statistic {name!r} is already registered by {type(existing).__qualname__}.")
    _STATISTICS[name] = cls()
    return cls


def get_statistic(name: str) -> Statistic:
    """The registered statistic called `name`.

    Raises:
        `ValueError`: When no statistic has that name.
    """
    try:
        return _STATISTICS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown statistic {name!r}; choose one of {', '.join(_STATISTICS)}.") from None


def available_statistics() -> tuple[str, ...]:
    """Names of the registered statistics."""
    return tuple(_STATISTICS)
