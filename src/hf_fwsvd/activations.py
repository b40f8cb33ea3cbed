"""Calibration statistics of the inputs of linear layers, for activation-aware factorisation.

Forward hooks on each targeted layer accumulate, over every real (non-padding) token ``x`` reaching it:

- the second moment ``C = 1/n sum x x^T`` (fp32, ``in x in``), used by `method="whiten"` (SVD-LLM): factorising
  ``W C^{1/2}`` makes each discarded singular value squared equal to the output error it causes on the calibration
  data;
- the mean magnitude ``1/n sum |x|`` (fp32, length ``in``), used by `method="asvd"` (ASVD's column scaling).

Only forward passes run (under `torch.no_grad()`), so no labels are needed. Padding is excluded using the batch's
`attention_mask` when its shape matches the layer input's leading ``(batch, sequence)`` dimensions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import is_supported_linear

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


class _ActivationHooks:
    def __init__(self, modules: dict[str, nn.Module], second_moment: bool) -> None:
        self.modules = modules
        self.second_moment = second_moment
        self.moments: dict[str, torch.Tensor] = {}
        self.magnitudes: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.mask: torch.Tensor | None = None
        self.handles: list[Any] = []

    def attach(self) -> None:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            hidden = args[0]
            if not torch.is_tensor(hidden) or not hidden.is_floating_point():
                return
            rows = hidden.detach().to(torch.float32)
            if self.mask is not None and rows.ndim == 3 and tuple(self.mask.shape) == tuple(rows.shape[:2]):
                rows = rows[self.mask.to(rows.device).bool()]
            rows = rows.reshape(-1, rows.shape[-1])
            if name in self.tokens:
                self.magnitudes[name] += rows.abs().sum(0)
                if self.second_moment:
                    self.moments[name] += rows.T @ rows
                self.tokens[name] += rows.shape[0]
            else:
                self.magnitudes[name] = rows.abs().sum(0)
                if self.second_moment:
                    self.moments[name] = rows.T @ rows
                self.tokens[name] = rows.shape[0]

        return hook


def collect_activation_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module] | list[str],
    second_moment: bool = True,
    show_progress: bool = True,
) -> ActivationStatistics:
    """Run `model` over calibration `batches` and collect the input statistics of `modules`.

    The model runs in eval mode under `torch.no_grad()`; its mode is restored and every hook removed afterwards.

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
    if not isinstance(modules, dict):
        modules = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        if not is_supported_linear(module):
            raise ValueError(f"`{name}` is a {type(module).__name__}, not a linear layer; cannot collect activations.")
    device = next(model.parameters()).device
    hooks = _ActivationHooks(modules, second_moment)
    was_training = model.training
    model.eval()
    hooks.attach()
    batches_seen = 0
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc="Activations", unit="batch", disable=not show_progress):
                if isinstance(batch, dict):
                    batch = {
                        key: value.to(device) if torch.is_tensor(value) else value
                        for key, value in batch.items()
                        if key != "labels"
                    }
                    hooks.mask = batch.get("attention_mask")
                    model(**batch)
                else:
                    hooks.mask = None
                    model(batch.to(device) if torch.is_tensor(batch) else batch)
                batches_seen += 1
    finally:
        hooks.detach()
        model.train(was_training)
    if batches_seen == 0:
        raise ValueError("The calibration data produced no batches: activation statistics need at least one example.")
    missing = [name for name in modules if not hooks.tokens.get(name)]
    if missing:
        raise ValueError(
            f"No calibration token reached {len(missing)} targeted module(s), e.g. `{missing[0]}`. Check the "
            "calibration data or exclude them with `modules_to_not_convert`."
        )
    stats = ActivationStatistics(tokens=dict(hooks.tokens))
    for name in modules:
        count = hooks.tokens[name]
        stats.abs_mean[name] = (hooks.magnitudes[name] / count).cpu()
        if second_moment:
            stats.second_moment[name] = (hooks.moments[name] / count).cpu()
    return stats
