"""Global rank allocation under a parameter budget (`FWSVDConfig(param_budget=..., allocation="fisher")`).

Every module ``m`` (``out_m x in_m``) comes with a non-increasing list of direction scores ``s_m1 >= s_m2 >= ...``:
``s_mk`` estimates the loss increase caused by dropping the ``k``-th direction of its weighted factorisation (see
[`direction_scores`]). Keeping rank ``r_m`` costs ``r_m (in_m + out_m)`` weights, unless that is at least
``in_m out_m``: then the module stays dense (``in_m out_m`` weights, no error). We minimise the summed discarded
score ``sum_m sum_{k > r_m} s_mk`` subject to the total kept weights staying within
``budget_params = floor(param_budget * sum_m in_m out_m)``.

The greedy: every module starts at rank 1; the remaining directions are taken in decreasing order of score per
weight, ``s_mk / (in_m + out_m)``, each only after its module's previous one (scores are non-increasing, so this is
the sorted order anyway) and only if it fits. The step that reaches the break-even rank turns the module dense
(costing ``in_m out_m`` minus what the module already held) and drops its remaining directions. Passes repeat until
nothing more fits. Guarantees (tested): the total never exceeds ``budget_params``; at the end no module could take
one more step within the budget (the unused slack is smaller than every module's next step); each module's rank is
at least 1 and, for a kept low-rank module, ``r (in + out) < in out``. When every module has the same
``in + out`` and none reaches break-even, the greedy is exactly optimal (an exchange argument).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .factorize import full_rank

__all__ = ["Allocation", "ModuleCost", "allocate_ranks", "direction_scores"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleCost:
    """What one module costs in the budget's unit.

    Args:
        direction (`int`): Each kept direction (``in + out`` weights; in bytes, ``(in + out)`` factor elements plus
            the per-direction scale of an int8 `down`).
        dense (`int`): The module left dense.
        fixed (`int`, *optional*, defaults to 0): Paid once by a low-rank module whatever its rank (the per-row
            scales of an int8 `up`).
    """

    direction: int
    dense: int
    fixed: int = 0


@dataclass
class Allocation:
    """The outcome of an allocation.

    Args:
        ranks (`dict[str, int]`): Rank of every module that is factorised.
        dense (`list[str]`): Modules left dense (their budget share would not pay off as a low-rank form).
        kept_params (`int`): Weights kept over all considered modules (low-rank plus dense).
        budget_params (`int`): ``floor(param_budget * dense_params)``.
        dense_params (`int`): Weights of all considered modules before compression.
    """

    ranks: dict[str, int]
    dense: list[str] = field(default_factory=list)
    kept_params: int = 0
    budget_params: int = 0
    dense_params: int = 0


def direction_scores(weighted_matrix: torch.Tensor, mass: float | None = None) -> torch.Tensor:
    """Scores of the directions of one module: its weighted singular values squared, rescaled to sum to `mass`.

    Args:
        weighted_matrix (`torch.Tensor`): ``W M`` for the method's input weighting ``M``.
        mass (`float`, *optional*): The module's share of the loss, e.g. its Fisher mass ``sum_oi F_i W_oi^2``; the
            squared singular values are kept as they are when `None`.

    Returns:
        `torch.Tensor`: float64, non-increasing, length ``min(out, in)``.
    """
    with torch.no_grad():
        energy = torch.linalg.svdvals(weighted_matrix.detach().to(torch.float32)).to(torch.float64).square()
        energy = torch.cummin(energy, 0).values  # guard against rounding breaking the order
        if mass is not None:
            energy = energy * (mass / energy.sum().clamp_min(1e-300))
    return energy


def allocate_ranks(
    shapes: dict[str, tuple[int, int]],
    scores: dict[str, torch.Tensor],
    param_budget: float,
    costs: dict[str, ModuleCost] | None = None,
    keep_dense: Iterable[str] = (),
) -> Allocation:
    """Choose every module's rank within `param_budget` of the modules' total weights (see the module docstring).

    Args:
        shapes (`dict[str, tuple[int, int]]`): Module name -> ``(out_features, in_features)``.
        scores (`dict[str, torch.Tensor]`): Module name -> non-increasing direction scores (length ``min(out, in)``).
        param_budget (`float`): Fraction of the modules' weights to keep, in (0, 1).
        costs (`dict[str, ModuleCost]`, *optional*): Module name -> what it costs in another unit (bytes, see
            [`ModuleCost`]); the budget is then that fraction of the summed dense costs. Default: weights
            (``in + out`` per direction, ``in out`` dense). A module whose next step would reach its full rank turns
            dense instead (a full-rank factorisation compresses nothing that the exact dense weight does not).
        keep_dense (`Iterable[str]`, *optional*): Modules that stay dense whatever their scores (e.g. attention-sink
            modules, `hf_fwsvd.sinks`); they count in full against the budget.

    Raises:
        `ValueError`: When the budget cannot hold rank 1 for every module, or scores are missing or mis-shaped.
    """
    if not 0 < param_budget < 1:
        raise ValueError(f"`param_budget` must be in (0, 1), got {param_budget}.")
    for name, (out_features, in_features) in shapes.items():
        if name not in scores:
            raise ValueError(f"No direction scores for `{name}`; cannot allocate its rank.")
        if scores[name].shape != (full_rank((out_features, in_features)),):
            raise ValueError(
                f"Scores for `{name}` have shape {tuple(scores[name].shape)}, expected "
                f"({full_rank((out_features, in_features))},)."
            )
    if costs is None:
        costs = {name: ModuleCost(out + inp, out * inp) for name, (out, inp) in shapes.items()}
    dense_cost = {name: costs[name].dense for name in shapes}
    dense_params = sum(dense_cost.values())
    budget_params = math.floor(param_budget * dense_params)
    ranks = {name: 1 for name in shapes}
    step_cost = {name: costs[name].direction for name in shapes}
    held = {name: costs[name].fixed + step_cost[name] for name in shapes}
    forced = set(keep_dense)
    unknown = sorted(forced - set(shapes))
    if unknown:
        raise ValueError(f"`keep_dense` names module(s) the allocation does not target: {', '.join(unknown)}.")
    dense: set[str] = set()
    for name in shapes:
        if name in forced or held[name] >= dense_cost[name]:  # kept dense, or even rank 1 does not pay off
            dense.add(name)
            held[name] = dense_cost[name]
    used = sum(held.values())
    if used > budget_params:
        kept = f" (with {len(forced)} kept dense)" if forced else ""
        raise ValueError(
            f"`param_budget={param_budget}` allows {budget_params:,} weights, but rank 1 in every one of the "
            f"{len(shapes)} targeted modules{kept} already needs {used:,}. Raise `param_budget` or target fewer "
            "modules."
        )
    order = []
    for name in shapes:
        if name not in dense:
            values = scores[name].tolist()
            order.extend((values[k] / step_cost[name], name, k) for k in range(1, len(values)))
    order.sort(key=lambda item: (-item[0], item[1], item[2]))
    changed = True
    while changed:
        changed = False
        for _, name, k in order:
            if name in dense or k != ranks[name]:  # taken, dense, or an earlier direction has not fitted yet
                continue
            turns_dense = costs[name].fixed + (k + 1) * step_cost[name] >= dense_cost[name] or k + 1 >= full_rank(
                shapes[name]
            )
            step = dense_cost[name] - held[name] if turns_dense else step_cost[name]
            if used + step > budget_params:
                continue
            used += step
            held[name] += step
            changed = True
            if turns_dense:
                dense.add(name)
            else:
                ranks[name] = k + 1
    low_rank = {name: rank for name, rank in ranks.items() if name not in dense}
    allocation = Allocation(
        ranks=low_rank,
        dense=sorted(dense),
        kept_params=used,
        budget_params=budget_params,
        dense_params=dense_params,
    )
    logger.info(
        "Allocated ranks for %d modules (%d left dense): %s of %s weights kept (budget %s).",
        len(low_rank),
        len(dense),
        f"{used:,}",
        f"{dense_params:,}",
        f"{budget_params:,}",
    )
    return allocation
