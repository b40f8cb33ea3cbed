"""What each `FWSVDConfig.method` needs from the calibration data, and how it factorises one module.

Every method minimises an input-side weighted error ``||(W - A B) M||_F`` (see `factorize`), except `tfwsvd`, which
then refines the FWSVD factors on the element-wise Fisher objective (see `refine`):

==================  ===============================================  =======================================
method              weighting ``M M^T``                              statistics
==================  ===============================================  =======================================
``svd``             identity                                         none
``fwsvd``           ``diag(F)``, row Fisher (the paper)              Fisher pass (labels)
``tfwsvd``          ``diag(F)``, then element-wise ALS on ``I_oi``   Fisher pass + per-element Fisher
``asvd``            ``diag(mean |x|)`` (ASVD, alpha = 0.5)           forward pass
``whiten``          ``E[x x^T]`` (SVD-LLM)                           forward pass
``fisher_whiten``   ``E[|g|^2 x x^T]``, gradient-weighted moment      Fisher pass (labels)
==================  ===============================================  =======================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .activations import ActivationStatistics, collect_activation_statistics
from .calibration import calibration_loader_from_config
from .config import FWSVDConfig
from .factorize import LowRankFactors, apply_weighting, factorize, input_weighting
from .fisher import FisherStatistics, estimate_fisher_statistics, model_loss
from .importances import check_importances, load_importances
from .refine import refine_elementwise
from .replace import shape_of

__all__ = [
    "ACTIVATION_METHODS",
    "FISHER_METHODS",
    "Statistics",
    "check_statistics",
    "collect_statistics",
    "factorize_module",
    "module_importance",
    "needs_fisher",
]

logger = logging.getLogger(__name__)

FISHER_METHODS = ("fwsvd", "tfwsvd", "fisher_whiten")
ACTIVATION_METHODS = ("whiten", "asvd")


@dataclass
class Statistics:
    """Everything collected on the calibration data for one compression run (either part may be `None`)."""

    fisher: FisherStatistics | None = None
    activations: ActivationStatistics | None = None


def needs_fisher(config: FWSVDConfig) -> bool:
    """Whether the run needs a Fisher pass: a Fisher-weighted method or the Fisher rank allocation."""
    return config.method in FISHER_METHODS or config.allocation == "fisher" and config.param_budget is not None


def collect_statistics(
    model: nn.Module,
    config: FWSVDConfig,
    targets: dict[str, nn.Module],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
    row_importances: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> Statistics:
    """Run the calibration passes `config` needs (none for plain SVD with a fixed rank rule).

    Precomputed `config.importances` replace the row Fisher; `tfwsvd` and `fisher_whiten` still need calibration data
    for their extra statistics. `row_importances`, when given, supplies the row Fisher where nothing else is needed
    from the Fisher pass (`compress` passes `compute_importances`, which honours `importances_cache`).
    """
    stats = Statistics()
    wants_fisher = needs_fisher(config)
    extras = config.method in ("tfwsvd", "fisher_whiten")
    in_features = {name: shape_of(module)[1] for name, module in targets.items()}
    loader = None
    row_only = wants_fisher and not extras and (row_importances is not None or config.importances is not None)
    if config.method in ACTIVATION_METHODS or (wants_fisher and not row_only):
        loader = calibration_loader_from_config(config, model)
    if wants_fisher:
        if row_only:
            importances = row_importances() if row_importances is not None else load_importances(config.importances)
            check_importances(importances, in_features)
            stats.fisher = FisherStatistics({name: importances[name] for name in targets})
        else:
            stats.fisher = estimate_fisher_statistics(
                model,
                loader,
                targets,
                loss_fn or model_loss,
                show_progress,
                elementwise=config.method == "tfwsvd",
                second_moment=config.method == "fisher_whiten",
                estimator=config.fisher_estimator,
            )
            if config.importances is not None:
                importances = load_importances(config.importances)
                check_importances(importances, in_features)
                stats.fisher.importance = {name: importances[name] for name in targets}
            check_importances(stats.fisher.importance, in_features)
    if config.method in ACTIVATION_METHODS:
        stats.activations = collect_activation_statistics(
            model, loader, targets, second_moment=config.method == "whiten", show_progress=show_progress
        )
    return stats


def check_statistics(config: FWSVDConfig, stats: Statistics, targets: dict[str, nn.Module]) -> None:
    """Raise a `ValueError` when precomputed `stats` lack what `config` needs for some target."""
    needed = []
    if needs_fisher(config):
        needed.append(("fisher.importance", stats.fisher.importance if stats.fisher else None))
    if config.method == "tfwsvd":
        needed.append(("fisher.elementwise", stats.fisher.elementwise if stats.fisher else None))
    if config.method == "fisher_whiten":
        needed.append(("fisher.second_moment", stats.fisher.second_moment if stats.fisher else None))
    if config.method == "whiten":
        needed.append(("activations.second_moment", stats.activations.second_moment if stats.activations else None))
    if config.method == "asvd":
        needed.append(("activations.abs_mean", stats.activations.abs_mean if stats.activations else None))
    for label, table in needed:
        missing = [name for name in targets if not table or name not in table]
        if missing:
            raise ValueError(
                f"The given statistics lack `{label}` for {len(missing)} targeted module(s), e.g. `{missing[0]}`, "
                f"which method={config.method!r} (allocation={config.allocation!r}) needs. Collect them with "
                "`collect_statistics` for this config, or do not pass `statistics=`."
            )


def module_importance(method: str, stats: Statistics, name: str) -> torch.Tensor | None:
    """The importance (vector or PSD matrix) that weighs `name`'s factorisation under `method`."""
    if method == "svd":
        return None
    if method in ("fwsvd", "tfwsvd"):
        return stats.fisher.importance[name]
    if method == "fisher_whiten":
        return stats.fisher.second_moment[name]
    if method == "asvd":
        return stats.activations.abs_mean[name]
    if method == "whiten":
        return stats.activations.second_moment[name]
    raise ValueError(f"Unknown method {method!r}.")


def fisher_mass(weight: torch.Tensor, importance: torch.Tensor) -> float:
    """``sum_oi F_i W_oi^2``: the diagonal-Fisher estimate of the loss increase if the module were zeroed."""
    dense = weight.detach().to(torch.float32)
    return float((dense.square().sum(0) * importance.to(torch.float32).to(dense.device)).sum())


def weighted_matrix(weight: torch.Tensor, importance: torch.Tensor | None, floor: float) -> torch.Tensor:
    """``W M`` for the importance's weighting (the matrix whose singular values rank the directions)."""
    dense = weight.detach().to(torch.float32)
    weighting = input_weighting(importance.to(dense.device) if importance is not None else None, floor)
    return apply_weighting(dense, weighting)


def factorize_module(
    weight: torch.Tensor,
    rank: int,
    config: FWSVDConfig,
    stats: Statistics,
    name: str,
) -> tuple[LowRankFactors, torch.Tensor | None]:
    """Factorise one module's weight with `config.method`.

    Returns:
        `tuple`: float32 [`LowRankFactors`] and the importance used (for the report's weighted error).
    """
    importance = module_importance(config.method, stats, name)
    factors = factorize(
        weight, rank, importance, floor=config.importance_floor, name=name, svd_solver=config.svd_solver
    )
    if config.method == "tfwsvd":
        result = refine_elementwise(
            weight,
            stats.fisher.elementwise[name],
            factors,
            iterations=config.refine_iterations,
            floor=config.importance_floor,
            name=name,
        )
        logger.debug("tfwsvd `%s`: element-wise objective lowered by %.2f%%.", name, 100 * result.improvement)
        factors = result.factors
    return factors, importance
