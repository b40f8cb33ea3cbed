"""The registry of compression methods: name -> [`CompressionMethod`] instance.

Every consumer (config validation, CLI choices and `--help`, sweep plot styles, model card, test matrix) reads it, so
adding a method is one new file that subclasses `CompressionMethod` and calls [`register_method`].
"""

from __future__ import annotations

import logging
from typing import TypeVar

from ..statistics import available_statistics
from .base import CompressionMethod

__all__ = ["available_methods", "get_method", "register_method", "unregister_method"]

logger = logging.getLogger(__name__)

_METHODS: dict[str, CompressionMethod] = {}
_REQUIRED = ("name", "title", "short_title", "summary")

MethodClass = TypeVar("MethodClass", bound=type)


def register_method(cls: MethodClass) -> MethodClass:
    """Register a [`CompressionMethod`] subclass under its `name` (usable as a class decorator).

    Raises:
        `TypeError`: When `cls` is not a `CompressionMethod` subclass.
        `ValueError`: When a class attribute is missing or malformed, or another class already holds the name.
    """
    if not (isinstance(cls, type) and issubclass(cls, CompressionMethod)):
        raise TypeError(f"register_method() takes a CompressionMethod subclass, got {cls!r}.")
    for attribute in _REQUIRED:
        value = getattr(cls, attribute, None)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{cls.__name__} must set the class attribute `{attribute}` (a non-empty str).")
    if not cls.name.isidentifier():
        raise ValueError(f"Method name {cls.name!r} of {cls.__name__} must be a Python identifier.")
    if not isinstance(cls.statistics, tuple) or not all(isinstance(item, str) for item in cls.statistics):
        raise ValueError(f"{cls.__name__}.statistics must be a tuple of statistic names, got {cls.statistics!r}.")
    unknown = [item for item in cls.statistics if item not in available_statistics()]
    if unknown:
        raise ValueError(
            f"{cls.__name__} needs the unknown statistic {unknown[0]!r}; register it first "
            f"(`hf_fwsvd.statistics.register_statistic`) or choose one of {', '.join(available_statistics())}."
        )
    existing = _METHODS.get(cls.name)
    if existing is not None and (type(existing).__module__, type(existing).__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise ValueError(
            f"Method {cls.name!r} is already registered by {type(existing).__module__}.{type(existing).__qualname__}; "
            "choose another name or call `unregister_method` first."
        )
    _METHODS[cls.name] = cls()
    logger.debug("Registered compression method %r (%s).", cls.name, cls.__qualname__)
    return cls


def unregister_method(name: str) -> None:
    """Remove a registered method (for tests and plug-ins that replace one)."""
    get_method(name)
    del _METHODS[name]


def get_method(name: str) -> CompressionMethod:
    """The registered method called `name`.

    Raises:
        `ValueError`: When no method has that name.
    """
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(_METHODS)}.") from None


def available_methods() -> tuple[str, ...]:
    """Names of the registered methods, built-ins first in registration order."""
    return tuple(_METHODS)
