"""Empirical Fisher importances, reduced to one value per input feature of each targeted linear layer.

For a linear layer ``y = x W^T + b`` the gradient of a loss ``L`` w.r.t. ``W`` is ``g^T x`` with ``g = dL/dy``.
We read ``x`` with a forward hook and ``g`` with a hook on the layer's output, form each example's weight gradient,
square it, sum it over output features (the paper's row sum in its ``in x out`` layout) and add it to an fp32 vector
of length ``in_features``. No parameter ever gets a ``.grad``: all parameters are frozen during estimation and
gradients flow only through activations, so the persistent extra memory is the sum of the ``in_features`` of the
targets; the transient extra memory is each targeted layer's input, held until its gradient arrives, plus one bounded
chunk of per-example products (see `per_example_squared_sums`).

The importance of input feature ``i`` of a layer is ``F_i = 1/N sum_n sum_o (dL_n/dW_oi)^2`` over the ``N``
calibration examples, where ``L_n`` is example ``n``'s loss. The per-example gradients are recovered from the gradient
of the batch-mean loss by scaling with the batch size, which is exact when the model's loss is a mean over examples
(classification, regression) and a close approximation when it is a mean over tokens (causal LM).

The estimation itself is the shared calibration pass of `hf_fwsvd.statistics` (statistics ``row_fisher``,
``elementwise_fisher``, ``gradient_second_moment``); this module keeps the Fisher-only entry points. Two optional
extras (see [`estimate_fisher_statistics`]) come from the same hooks:

- ``elementwise=True`` (for `method="tfwsvd"`): the full per-element Fisher ``I_oi = 1/N sum_n (dL_n/dW_oi)^2``, one
  fp32 ``out x in`` matrix per module: a second copy of the targeted parameters in memory.
- ``second_moment=True`` (for `method="fisher_whiten"`): the gradient-weighted activation second moment
  ``C = 1/N sum_n sum_t |g_nt|^2 x_nt x_nt^T`` (``in x in`` per module, with the same batch-size scaling), whose
  diagonal is the per-token version of the row Fisher above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .statistics import collect, model_loss
from .statistics.per_example import CHUNK_ELEMENTS, per_example_squared_gradients, per_example_squared_sums

__all__ = [
    "CHUNK_ELEMENTS",
    "FisherStatistics",
    "estimate_fisher",
    "estimate_fisher_statistics",
    "model_loss",
    "per_example_squared_gradients",
    "per_example_squared_sums",
]

logger = logging.getLogger(__name__)


@dataclass
class FisherStatistics:
    """What one Fisher pass collected; every tensor is fp32 on CPU, keyed by module name.

    Args:
        importance (`dict[str, torch.Tensor]`): Row Fisher, one value per input feature (always present).
        elementwise (`dict[str, torch.Tensor]`): Per-element Fisher ``out x in`` (only when requested).
        second_moment (`dict[str, torch.Tensor]`): Gradient-weighted activation second moment ``in x in`` (only
            when requested).
    """

    importance: dict[str, torch.Tensor]
    elementwise: dict[str, torch.Tensor] = field(default_factory=dict)
    second_moment: dict[str, torch.Tensor] = field(default_factory=dict)


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module] | list[str],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = model_loss,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Estimate per-input-feature empirical Fisher importances of `modules` on calibration `batches`.

    Same arguments as [`estimate_fisher_statistics`] without the extras; returns its `importance` dict.
    """
    return estimate_fisher_statistics(model, batches, modules, loss_fn, show_progress).importance


def estimate_fisher_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module] | list[str],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = model_loss,
    show_progress: bool = True,
    elementwise: bool = False,
    second_moment: bool = False,
) -> FisherStatistics:
    """Estimate the empirical Fisher statistics of `modules` on calibration `batches`.

    The model runs in eval mode (no dropout) with every parameter frozen; afterwards its mode and `requires_grad`
    flags are restored, no hook is left and no parameter has a gradient.

    Under ``accelerate launch`` / ``torchrun`` with several processes, each process passes the same `batches` and
    its own copy of the model (not wrapped in DDP); each works on a round-robin share of whole batches (see
    [`~hf_fwsvd.distributed.shard_batches`]), the sums and example counts are added over processes, and every process
    returns the same importances, equal to a single-process run on the same batches up to summation order. A model
    dispatched with `device_map` (accelerate hooks, offloading included) works too. A module used several times per
    forward pass (weight sharing) gets the Fisher of its total gradient.

    Args:
        model (`nn.Module`): The model; `loss_fn(model, batch)` must return a scalar task loss.
        batches (`Iterable`): Calibration batches (dicts of tensors for transformers models).
        modules (`dict[str, nn.Module]` or `list[str]`): Target linear layers, or their names in `model`.
        loss_fn (`Callable`, *optional*): Loss of one batch; defaults to the model's own `outputs.loss`.
        show_progress (`bool`, *optional*, defaults to `True`): Show a tqdm progress bar over batches.
        elementwise (`bool`, *optional*, defaults to `False`): Also collect the per-element Fisher (``out x in`` per
            module: as much memory as the targeted weights).
        second_moment (`bool`, *optional*, defaults to `False`): Also collect the gradient-weighted activation
            second moment (``in x in`` per module).

    Returns:
        [`FisherStatistics`]: `importance` maps module name -> fp32 vector of length ``in_features`` (on CPU).
    """
    names = ["row_fisher"]
    if elementwise:
        names.append("elementwise_fisher")
    if second_moment:
        names.append("gradient_second_moment")
    stats = collect(model, batches, modules, names, loss_fn, show_progress)
    return FisherStatistics(
        stats["row_fisher"], stats.get("elementwise_fisher", {}), stats.get("gradient_second_moment", {})
    )
