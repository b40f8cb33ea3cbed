"""Calibration statistics: named units (`row_fisher`, `activation_second_moment`, ...) that compression methods
declare, and the one collector that gathers any set of them in a single pass (hooks, batch placement, data-parallel
sharding and all-reduce, `device_map` / offloading, resumable cache).

Adding a statistic = subclass [`Statistic`] (`name`, `needs_backward`, `per`, `shape`, `accumulate`) and decorate it
with [`register_statistic`].
"""

from . import builtin  # noqa: F401  (registers the built-in statistics)
from .base import Observation, Statistic, Statistics
from .collector import collect, input_device, model_loss
from .registry import available_statistics, get_statistic, register_statistic

__all__ = [
    "Observation",
    "Statistic",
    "Statistics",
    "available_statistics",
    "collect",
    "get_statistic",
    "input_device",
    "model_loss",
    "register_statistic",
]
