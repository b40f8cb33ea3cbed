"""The Python entry points: `compress` a loaded model and `decompress` it back to dense layers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import FWSVDConfig
from .layers import LowRankLinear
from .methods import Statistics, collect_statistics
from .pipeline import compress_model
from .quantizer import mark_compressed
from .replace import replace_with_dense
from .targets import find_target_modules

__all__ = ["compress", "compute_importances", "decompress"]

logger = logging.getLogger(__name__)


def compute_importances(
    model: nn.Module,
    config: FWSVDConfig,
    targets: dict[str, nn.Module] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Fisher importances of the modules `config` targets, from its calibration data or precomputed importances.

    Honours `config.importances` (returned after checking) and `config.importances_cache` (reused when present,
    written otherwise), like `compress`.

    Args:
        model (`nn.Module`): The dense model with a task head.
        config ([`FWSVDConfig`]): Supplies `calibration_dataset`, `tokenizer`, ... or `importances`.
        targets (`dict[str, nn.Module]`, *optional*): Already-resolved targets.
        loss_fn (`Callable`, *optional*): Custom loss `loss_fn(model, batch)`; defaults to the model's own loss.
        show_progress (`bool`, *optional*): Progress bar over calibration batches.
    """
    targets = targets if targets is not None else find_target_modules(model, config)
    stats = collect_statistics(model, config, targets, loss_fn, show_progress, statistics=("row_fisher",))
    return dict(stats["row_fisher"])


def compress(
    model: nn.Module,
    config: FWSVDConfig,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
    statistics: Statistics | None = None,
) -> nn.Module:
    """Compress `model` in place with `config.method` (FWSVD by default; any registered method) and return it.

    Every targeted linear layer becomes a [`LowRankLinear`]. The model's `config.quantization_config` becomes a copy
    of `config` holding the resolved rank map, so `save_pretrained` writes a checkpoint that
    `from_pretrained` rebuilds. `config` itself is not modified. A per-module report is stored as
    `model.fwsvd_report` ([`CompressionReport`]). The steps are those of `hf_fwsvd.pipeline`.

    Args:
        model (`nn.Module`): A loaded dense model (a transformers `PreTrainedModel` for saving and reloading).
        config ([`FWSVDConfig`]): What to compress and how.
        loss_fn (`Callable`, *optional*): Custom calibration loss `loss_fn(model, batch) -> scalar`.
        show_progress (`bool`, *optional*, defaults to `True`): Progress bars for calibration and factorisation.
        statistics ([`~hf_fwsvd.statistics.Statistics`], *optional*): Calibration statistics already collected on
            this dense model (see `hf_fwsvd.methods.collect_statistics`), to compress one model at several settings
            without repeating the calibration passes.

    Raises:
        `ValueError`: For bad config values, no matched modules, missing calibration data or bad importances. On
            any failure (including one in the middle of factorisation, or an interrupt) the model is left unchanged:
            modules already factorised are put back.
    """
    if any(isinstance(module, LowRankLinear) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} is already FWSVD-compressed; compress the dense model instead.")
    run_config, report = compress_model(model, config, loss_fn, show_progress, statistics)
    mark_compressed(model, run_config)
    model.fwsvd_report = report
    logger.info(
        "FWSVD (%s) compressed %d modules: %s -> %s parameters (%.1f%% kept).",
        run_config.method,
        len(run_config.ranks),
        f"{report.model_params_before:,}",
        f"{report.model_params_after:,}",
        100 * report.params_ratio,
    )
    return model


def decompress(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `LowRankLinear` by a dense layer and drop the FWSVD quantization config (a dense export).

    A model saved afterwards loads with plain transformers, no hf_fwsvd needed.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    source_classes = getattr(config, "source_classes", None) or {}
    replaced = replace_with_dense(model, source_classes, dtype)
    if replaced == 0:
        raise ValueError(f"{type(model).__name__} has no LowRankLinear module to decompress.")
    for attribute in ("hf_quantizer", "quantization_method", "fwsvd_report"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    if hasattr(model, "config"):
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._is_quantized = False
        model.is_quantized = False
    return model
