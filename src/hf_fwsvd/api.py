"""The Python entry points: `compress` a loaded model and `decompress` it back to dense layers."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import allocate_ranks, direction_scores
from .calibration import calibration_loader_from_config
from .config import FWSVDConfig
from .defaults import resolve_defaults
from .distributed import is_main_process
from .factorize import low_rank_params, relative_errors
from .fisher import estimate_fisher, model_loss
from .importances import check_importances, load_importances, save_importances
from .layers import LowRankLinear, dense_weight
from .methods import (
    Statistics,
    check_statistics,
    collect_statistics,
    factorize_module,
    fisher_mass,
    module_importance,
    weighted_matrix,
)
from .payoff import low_rank_pays_off
from .ranks import rank_for_shape, resolve_ranks
from .replace import replace_with_dense, shape_of
from .report import CompressionReport, ModuleReport
from .targets import find_target_modules

__all__ = ["compress", "compute_importances", "decompress"]

logger = logging.getLogger(__name__)


def _count_params(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def _check_materialised(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    for name, module in targets.items():
        if dense_weight(module).device.type == "meta":
            raise ValueError(
                f"`{name}` has its weight on the meta device (offloaded to disk or CPU by `device_map`). `compress` "
                "must hold every dense weight: for a model that does not fit, use `hf_fwsvd.compress_layerwise` on "
                "its checkpoint folder (it estimates the Fisher with the same device_map and factorises block by "
                "block from disk), or load the model without offloading."
            )


def compute_importances(
    model: nn.Module,
    config: FWSVDConfig,
    targets: dict[str, nn.Module] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Fisher importances of the modules `config` targets, from its calibration data or precomputed importances.

    Args:
        model (`nn.Module`): The dense model with a task head.
        config ([`FWSVDConfig`]): Supplies `calibration_dataset`, `tokenizer`, ... or `importances`.
        targets (`dict[str, nn.Module]`, *optional*): Already-resolved targets.
        loss_fn (`Callable`, *optional*): Custom loss `loss_fn(model, batch)`; defaults to the model's own loss.
        show_progress (`bool`, *optional*): Progress bar over calibration batches.
    """
    targets = targets if targets is not None else find_target_modules(model, config)
    in_features = {name: shape_of(module)[1] for name, module in targets.items()}
    cache = config.importances_cache
    if config.importances is not None:
        importances = load_importances(config.importances)
    elif cache is not None and os.path.isfile(cache):
        logger.info("Reusing the importances saved in %s; Fisher estimation is skipped.", cache)
        importances = load_importances(cache)
        try:
            check_importances(importances, in_features)
        except ValueError as error:
            raise ValueError(
                f"{error} They were read from `importances_cache` {cache!r}: delete it to re-estimate."
            ) from error
    else:
        loader = calibration_loader_from_config(config, model)
        importances = estimate_fisher(model, loader, targets, loss_fn or model_loss, show_progress)
        if cache is not None and is_main_process():
            check_importances(importances, in_features)
            save_importances(importances, cache)
            logger.info("Saved the importances to %s; a restarted run will reuse them.", cache)
    check_importances(importances, in_features)
    return {name: importances[name] for name in targets}


def compress(
    model: nn.Module,
    config: FWSVDConfig,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
    statistics: Statistics | None = None,
) -> nn.Module:
    """Compress `model` in place with FWSVD (or plain SVD) and return it.

    Every targeted linear layer becomes a [`LowRankLinear`]. The model's `config.quantization_config` becomes a copy
    of `config` holding the resolved rank map, so `save_pretrained` writes a checkpoint that
    `from_pretrained` rebuilds. `config` itself is not modified. A per-module report is stored as
    `model.fwsvd_report` ([`CompressionReport`]).

    Args:
        model (`nn.Module`): A loaded dense model (a transformers `PreTrainedModel` for saving and reloading).
        config ([`FWSVDConfig`]): What to compress and how.
        loss_fn (`Callable`, *optional*): Custom calibration loss `loss_fn(model, batch) -> scalar`.
        show_progress (`bool`, *optional*, defaults to `True`): Progress bars for Fisher estimation and factorisation.
        statistics ([`~methods.Statistics`], *optional*): Calibration statistics already collected on this dense model
            (see `hf_fwsvd.methods.collect_statistics`), to compress one model at several settings without repeating
            the calibration passes.

    Raises:
        `ValueError`: For bad config values, no matched modules, missing calibration data or bad importances. On
            any failure (including one in the middle of factorisation, or an interrupt) the model is left unchanged:
            modules already factorised are put back.
    """
    if any(isinstance(module, LowRankLinear) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} is already FWSVD-compressed; compress the dense model instead.")
    run_config = resolve_defaults(model, config.copy_for_run())
    targets = find_target_modules(model, run_config)
    _check_materialised(model, targets)
    shapes = {name: shape_of(module) for name, module in targets.items()}
    ranks = resolve_ranks(shapes, run_config) if run_config.param_budget is None else None
    if statistics is None:
        # the row Fisher alone goes through `compute_importances` (precomputed importances, `importances_cache`)
        row_fisher = functools.partial(compute_importances, model, run_config, targets, loss_fn, show_progress)
        stats = collect_statistics(model, run_config, targets, loss_fn, show_progress, row_importances=row_fisher)
    else:
        stats = statistics
        check_statistics(run_config, stats, targets)
    dense_modules: list[str] = []
    if ranks is None:
        ranks, dense_modules = _budget_ranks(targets, shapes, run_config, stats)
    params_before = _count_params(model)
    report = CompressionReport(method=run_config.method, model_params_before=params_before)
    report.dense_modules = dense_modules
    if run_config.method != "svd" and run_config.importances is None:
        report.calibration_samples = _calibration_size(run_config)
    swapped: list[str] = []
    try:
        _factorise_all(model, targets, shapes, ranks, stats, run_config, report, swapped, show_progress)
    except BaseException:
        # Never leave a partially compressed model behind: put every dense module back (they are still in `targets`).
        for name in swapped:
            model.set_submodule(name, targets[name])
        raise
    run_config.ranks = ranks
    run_config.base_model = run_config.base_model or _source_name(model)
    report.base_model = run_config.base_model
    report.model_params_after = _count_params(model)
    _mark_compressed(model, run_config)
    model.fwsvd_report = report
    logger.info(
        "FWSVD (%s) compressed %d modules: %s -> %s parameters (%.1f%% kept).",
        run_config.method,
        len(ranks),
        f"{params_before:,}",
        f"{report.model_params_after:,}",
        100 * report.params_ratio,
    )
    return model


def _factorise_all(
    model: nn.Module,
    targets: dict[str, nn.Module],
    shapes: dict[str, tuple[int, int]],
    ranks: dict[str, int],
    stats: Statistics,
    run_config: FWSVDConfig,
    report: CompressionReport,
    swapped: list[str],
    show_progress: bool,
) -> None:
    """Factorise and swap every target in turn, recording each swapped name in `swapped` (for a rollback)."""
    for name, module in tqdm(targets.items(), desc="Factorising", unit="layer", disable=not show_progress):
        if name not in ranks:
            continue
        weight = dense_weight(module)
        factors, importance = factorize_module(weight, ranks[name], run_config, stats, name)
        replacement = LowRankLinear.from_factors(factors, module.bias, dtype=weight.dtype, device=weight.device)
        errors = relative_errors(weight, replacement.weight, importance)
        out_features, in_features = shapes[name]
        report.modules.append(
            ModuleReport(
                name=name,
                out_features=out_features,
                in_features=in_features,
                rank=ranks[name],
                params_before=out_features * in_features,
                params_after=low_rank_params(out_features, in_features, ranks[name]),
                plain_error=errors["plain"],
                weighted_error=errors["weighted"],
                pays_off=low_rank_pays_off(out_features, in_features, ranks[name]),
            )
        )
        if type(module).__name__ != "Linear":
            run_config.source_classes[name] = type(module).__name__
        model.set_submodule(name, replacement)
        swapped.append(name)


def _budget_ranks(
    targets: dict[str, nn.Module], shapes: dict[str, tuple[int, int]], config: FWSVDConfig, stats: Statistics
) -> tuple[dict[str, int], list[str]]:
    """Ranks under `config.param_budget`: the same fraction everywhere, or the global Fisher allocation."""
    if config.allocation == "uniform":
        uniform = FWSVDConfig(param_ratio=config.param_budget)
        return {name: rank_for_shape(*shape, uniform, name) for name, shape in shapes.items()}, []
    scores = {}
    for name, module in targets.items():
        weight = dense_weight(module)
        importance = module_importance(config.method, stats, name)
        mass = fisher_mass(weight, stats.fisher.importance[name]) ** config.allocation_power
        scores[name] = direction_scores(weighted_matrix(weight, importance, config.importance_floor), mass)
    allocation = allocate_ranks(shapes, scores, config.param_budget)
    return allocation.ranks, allocation.dense


def _calibration_size(config: FWSVDConfig) -> int | None:
    data = config.calibration_dataset
    if data is None or not hasattr(data, "__len__"):
        return None
    size = len(data.dataset) if hasattr(data, "dataset") and hasattr(data.dataset, "__len__") else len(data)
    return size if config.num_samples is None else min(size, config.num_samples)


def _source_name(model: nn.Module) -> str | None:
    """Where the dense model came from: its Hub id, or the absolute path of its local folder."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if source and os.path.isdir(source):
        return os.path.abspath(source)
    return source


def _mark_compressed(model: nn.Module, config: FWSVDConfig) -> None:
    """Make a model compressed outside `from_pretrained` look like one loaded through the quantizer."""
    from .quantizer import FWSVDHfQuantizer

    if not hasattr(model, "config"):
        return
    model.config.quantization_config = config
    model.hf_quantizer = FWSVDHfQuantizer(config, pre_quantized=True, copy_config=False)
    model.is_quantized = True
    model.quantization_method = "fwsvd"
    model.config._is_quantized = True


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
