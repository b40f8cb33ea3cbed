"""Calibration statistics of the inputs of linear layers, for activation-aware factorisation.

Forward hooks on each targeted layer accumulate, over every real (non-padding) token ``x`` reaching it:

- the second moment ``C = 1/n sum x x^T`` (fp32, ``in x in``), used by `method="whiten"` (SVD-LLM): factorising
  ``W C^{1/2}`` makes each discarded singular value squared equal to the output error it causes on the calibration
  data;
- the mean magnitude ``1/n sum |x|`` (fp32, length ``in``), used by `method="asvd"` (ASVD's column scaling).

These are the statistics ``activation_second_moment`` and ``activation_abs_mean`` of the shared calibration
pass (`hf_fwsvd.statistics`); this module keeps the activation-only entry point. Only forward passes run (under
`torch.no_grad()`), so no labels are needed. Padding is excluded using the batch's `attention_mask` when its shape
matches the layer input's leading ``(batch, sequence)`` dimensions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .statistics import collect

__all__ = ["ActivationStatistics", "collect_activation_statistics"]

logger = logging.getLogger(__name__)


@dataclass
class ActivationStatistics:
    """Per-module input statistics (fp32, CPU), keyed by module name.

    Args:
        second_moment (`dict[str, torch.Tensor]`): ``1/n sum x x^T`` over the ``n`` real tokens (``in x in``).
        abs_mean (`dict[str, torch.Tensor]`): ``1/n sum |x|`` (length ``in``).
        tokens (`dict[str, int]`): ``n`` per module.
    """

    second_moment: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def collect_activation_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module] | list[str],
    second_moment: bool = True,
    show_progress: bool = True,
) -> ActivationStatistics:
    """Run `model` over calibration `batches` and collect the input statistics of `modules`.

    The model runs in eval mode under `torch.no_grad()`; its mode is restored and every hook removed afterwards.
    Batches are sharded over the processes of a distributed run and go to the input device of a `device_map`-dispatched
    model, as for the Fisher (see `hf_fwsvd.statistics.collector`).

    Args:
        model (`nn.Module`): The model (called as ``model(**batch)`` for dict batches).
        batches (`Iterable`): Calibration batches; a `labels` entry is dropped (no loss is needed).
        modules (`dict[str, nn.Module]` or `list[str]`): Target linear layers, or their names in `model`.
        second_moment (`bool`, *optional*, defaults to `True`): Collect ``X^T X / n`` (``in x in`` per module);
            `False` collects only the mean magnitudes.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm progress bar over batches.

    Returns:
        [`ActivationStatistics`]

    Raises:
        `ValueError`: When a target is not a linear layer, the data has no batch, or no token reached a module.
    """
    names = ["activation_abs_mean"] + (["activation_second_moment"] if second_moment else [])
    stats = collect(model, batches, modules, names, show_progress=show_progress)
    return ActivationStatistics(
        second_moment=stats.get("activation_second_moment", {}),
        abs_mean=stats["activation_abs_mean"],
        tokens=dict(stats.tokens),
    )
