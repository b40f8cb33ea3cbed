"""LoRA recovery on a compressed model: adapters on the `down` / `up` factors (through peft), merged back after.

A LoRA adapter on a factor adds a rank-``k`` update ``b a`` to it (``down: r x in`` gets ``r x in``, ``up: out x r``
gets ``out x r``), so merging it changes the factors' values but never their shapes: the merged model is the same
FWSVD checkpoint (same rank map) and saves and reloads like any other. Only the adapters train (a few percent of the
factors' parameters), which makes a CPU recovery of a small LM take minutes.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .layers import LowRankLinear

__all__ = ["DEFAULT_LORA_TARGETS", "attach_lora", "default_lora_config", "merge_lora"]

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ["down", "up"]


def default_lora_config(rank: int = 8) -> Any:
    """`peft.LoraConfig` on every factor: ``r=rank``, ``lora_alpha=2 * rank``, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(DEFAULT_LORA_TARGETS))


def attach_lora(model: nn.Module, lora_config: Any = True) -> nn.Module:
    """Wrap a compressed `model` with LoRA adapters on its factors (`peft.get_peft_model`); only they train.

    Args:
        model (`nn.Module`): An FWSVD-compressed model.
        lora_config (`peft.LoraConfig` or `True`): The adapters; `True` means [`default_lora_config`]. A config
            without `target_modules` targets the factors (``["down", "up"]``).

    Raises:
        `ValueError`: When `model` has no `LowRankLinear` module.
    """
    from peft import get_peft_model

    if not any(isinstance(module, LowRankLinear) for module in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no LowRankLinear module: compress it before a LoRA recovery (the adapters "
            "go on the `down` / `up` factors)."
        )
    config = default_lora_config() if lora_config is True else lora_config
    if config.target_modules is None:
        config.target_modules = list(DEFAULT_LORA_TARGETS)
    return get_peft_model(model, config)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the factors and return the plain compressed model (same shapes, no peft wrappers)."""
    merged = peft_model.merge_and_unload()
    leftover = [name for name, _ in merged.named_modules() if "lora_" in name]
    if leftover:
        raise RuntimeError(f"LoRA modules survived the merge, e.g. `{leftover[0]}`; the checkpoint would not reload.")
    return merged
