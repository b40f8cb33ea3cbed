"""Swap modules in a model: dense -> `LowRankLinear` (compress or rebuild on reload) and back (dense export)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .layers import LowRankLinear, dense_weight, is_supported_linear

__all__ = ["build_low_rank_skeleton", "replace_with_dense", "shape_of"]


def shape_of(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a supported dense layer."""
    weight = dense_weight(module)
    return int(weight.shape[0]), int(weight.shape[1])


def _no_init() -> contextlib.AbstractContextManager:
    """transformers' context that turns `torch.nn.init` into no-ops (the skeleton's weights are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def build_low_rank_skeleton(model: nn.Module, ranks: dict[str, int]) -> dict[str, str]:
    """Replace each module named in `ranks` by an empty `LowRankLinear` of that rank (on the module's device, `meta`
    while transformers builds the model), so the factorised weights load straight into it.

    Args:
        model (`nn.Module`): A freshly built dense model.
        ranks (`dict[str, int]`): The saved rank map.

    Returns:
        `dict[str, str]`: Module name -> original class name for modules that were not `nn.Linear` (e.g. `Conv1D`).

    Raises:
        `ValueError`: When the rank map names a module that does not exist or is not a linear layer.
    """
    # The skeleton's weights are loaded right after: skip the random init of its two Linears per module, which made
    # reloading a compressed checkpoint markedly slower than loading the dense one (benchmarks/load_size.py).
    with _no_init():
        return _build_skeleton(model, ranks)


def _build_skeleton(model: nn.Module, ranks: dict[str, int]) -> dict[str, str]:
    source_classes = {}
    parents: dict[str, nn.Module] = {}  # the attention and MLP containers hold several targets each: look them up once
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        try:
            if parent_name not in parents:
                parents[parent_name] = model.get_submodule(parent_name)
            module = parents[parent_name].get_submodule(child)
        except AttributeError as error:
            raise ValueError(
                f"The checkpoint's rank map names `{name}`, which {type(model).__name__} does not have: the "
                "quantization_config does not belong to this model architecture."
            ) from error
        if not is_supported_linear(module):
            raise ValueError(
                f"The checkpoint's rank map names `{name}`, a {type(module).__name__} in {type(model).__name__}, "
                "not a linear layer: the quantization_config does not match this model."
            )
        out_features, in_features = shape_of(module)
        if not 1 <= rank < min(out_features, in_features):
            raise ValueError(
                f"The checkpoint's rank {rank} for `{name}` ({out_features}x{in_features}) is impossible: ranks "
                f"must be in [1, {min(out_features, in_features) - 1}]."
            )
        weight = dense_weight(module)
        replacement = LowRankLinear(
            in_features, out_features, rank, bias=module.bias is not None, device=weight.device, dtype=weight.dtype
        )
        if not isinstance(module, nn.Linear):
            source_classes[name] = type(module).__name__
        setattr(parents[parent_name], child, replacement)
    return source_classes


def _dense_module(module: LowRankLinear, source_class: str | None, dtype: torch.dtype | None) -> nn.Module:
    linear = module.to_linear()
    if dtype is not None:
        linear = linear.to(dtype)
    if source_class != "Conv1D":
        return linear
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(module.out_features, module.in_features).to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias = None
    return conv


def replace_with_dense(
    model: nn.Module, source_classes: dict[str, str] | None = None, dtype: torch.dtype | None = None
) -> int:
    """Replace every `LowRankLinear` in `model` by its dense equivalent (`nn.Linear`, or `Conv1D` where it was one).

    Returns:
        `int`: How many modules were replaced.
    """
    source_classes = source_classes or {}
    names = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    for name in names:
        model.set_submodule(name, _dense_module(model.get_submodule(name), source_classes.get(name), dtype))
    return len(names)
