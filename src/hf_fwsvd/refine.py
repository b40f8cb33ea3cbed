"""Element-wise Fisher-weighted refinement of a low-rank factorisation (`method="tfwsvd"`, after Hua et al., 2022).

Row-wise FWSVD weighs every entry of input column ``i`` by the same importance. The full objective is element-wise:

    f(A, B) = sum_oi I_oi (W - A B)_oi^2

with the per-element empirical Fisher ``I`` (``out x in``). It has no closed form, so we start from the FWSVD
factors and run alternating least squares: with ``B`` fixed, each row ``a_o`` of ``A`` solves the weighted least
squares ``(B diag(I_o) B^T) a_o = B diag(I_o) w_o``; then the same for each column of ``B`` with ``A`` fixed. Each
exact half-step cannot raise ``f``; a tiny ridge term keeps the ``r x r`` systems solvable when some weights vanish,
so every half-step is checked and rejected (ending the run) if ``f`` went up. The stopping rule: at most
`iterations` sweeps, or earlier when a sweep lowers ``f`` by less than ``tolerance`` (relative). The result is never
worse than the start on ``f``.

Cost per sweep: ``O(out * in * r^2)`` multiply-adds, in chunks of bounded memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .factorize import DEFAULT_IMPORTANCE_FLOOR, LowRankFactors

__all__ = ["RefinementResult", "refine_elementwise", "weighted_objective"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 24  # upper bound on the elements of one batched intermediate


@dataclass
class RefinementResult:
    """Refined factors and the objective after each accepted half-step (``history[0]`` is the start)."""

    factors: LowRankFactors
    history: list[float] = field(default_factory=list)

    @property
    def improvement(self) -> float:
        """Relative decrease of the objective, ``1 - final / start``."""
        return 1.0 - self.history[-1] / self.history[0] if self.history[0] > 0 else 0.0


def weighted_objective(weight: torch.Tensor, weights: torch.Tensor, factors: LowRankFactors) -> float:
    """``sum_oi weights_oi (weight - up @ down)_oi^2`` in float64."""
    with torch.no_grad():
        up, down = factors.up.detach().to(torch.float64), factors.down.detach().to(torch.float64)
        residual = weight.detach().to(torch.float64) - up @ down
        return float((weights.detach().to(torch.float64) * residual.square()).sum())


def _upper_weighted_grams(weights: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Upper triangles of ``right diag(weights[o]) right^T`` for every row ``o``, in float64 (zeros below).

    Row ``j`` of every Gram, from the diagonal on, is ``weights @ (right[j] * right[j:])^T``: one matrix product for
    all rows of `weights` at once, and half the work of the full Grams, which are symmetric.
    """
    rank = right.shape[0]
    columns = right.T.contiguous()  # in x r
    grams = torch.zeros(weights.shape[0], rank, rank, dtype=torch.float64, device=right.device)
    for j in range(rank):
        grams[:, j, j:] = weights @ (columns[:, j:] * columns[:, j : j + 1])
    return grams


def _solve_rows(target: torch.Tensor, weights: torch.Tensor, right: torch.Tensor, ridge: float) -> torch.Tensor:
    """Rows ``a_o`` minimising ``sum_i weights_oi (target_oi - a_o . right[:, i])^2`` (``right`` is ``r x in``).

    Each row's ``r x r`` normal equations, plus a ridge relative to the mean of their diagonal, are solved by
    Cholesky in float64; a row whose system is not numerically positive definite falls back to an LU solve.
    """
    rows = target.shape[0]
    rank = right.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(rank * rank, 1))
    solved = []
    for start in range(0, rows, chunk):
        w = weights[start : start + chunk]  # c x in
        system = _upper_weighted_grams(w, right)  # c x r x r, upper triangles
        rhs = ((w * target[start : start + chunk]) @ right.T).to(torch.float64).unsqueeze(-1)  # c x r x 1
        diagonal = system.diagonal(dim1=-2, dim2=-1)
        diagonal.add_(ridge * diagonal.mean(-1, keepdim=True).clamp_min(1e-30))
        factor, info = torch.linalg.cholesky_ex(system, upper=True)
        chunk_solved = torch.cholesky_solve(rhs, factor, upper=True)
        failed = info.nonzero().flatten()
        if failed.numel():
            upper = system[failed]
            chunk_solved[failed] = torch.linalg.solve(upper + upper.triu(1).transpose(-2, -1), rhs[failed])
        solved.append(chunk_solved.squeeze(-1).to(target.dtype))
    return torch.cat(solved)


def refine_elementwise(
    weight: torch.Tensor,
    elementwise_importance: torch.Tensor,
    start: LowRankFactors,
    iterations: int = 10,
    tolerance: float = 1e-4,
    floor: float = DEFAULT_IMPORTANCE_FLOOR,
    ridge: float = 1e-7,
    name: str = "weight",
) -> RefinementResult:
    """Lower ``sum_oi I_oi (W - A B)_oi^2`` from `start` by alternating least squares (see the module docstring).

    Args:
        weight (`torch.Tensor`): ``out x in`` dense weight.
        elementwise_importance (`torch.Tensor`): ``out x in`` non-negative per-element Fisher ``I``.
        start ([`LowRankFactors`]): Starting factors (the row-wise FWSVD solution).
        iterations (`int`, *optional*, defaults to 10): Maximum number of sweeps (each updates ``A`` then ``B``).
        tolerance (`float`, *optional*, defaults to 1e-4): Stop when a sweep lowers the objective by less than this
            fraction.
        floor (`float`, *optional*): Relative floor on ``I / max(I)`` (as in [`factorize`]).
        ridge (`float`, *optional*): Relative ridge added to each ``r x r`` system.
        name (`str`, *optional*): Module name for error messages.

    Returns:
        [`RefinementResult`]: float32 factors whose objective (with the floored, normalised weights) is at most the
        start's, and the objective history.
    """
    if tuple(elementwise_importance.shape) != tuple(weight.shape):
        raise ValueError(
            f"Element-wise importance for `{name}` has shape {tuple(elementwise_importance.shape)}, expected "
            f"{tuple(weight.shape)} (one value per weight). Collect it with `elementwise=True`."
        )
    if not torch.isfinite(elementwise_importance).all() or (elementwise_importance < 0).any():
        raise ValueError(f"Element-wise importance for `{name}` has negative or NaN/Inf values.")
    if not (elementwise_importance > 0).any():
        raise ValueError(f"Element-wise importance for `{name}` is all zeros: the loss has no gradient through it.")
    with torch.no_grad():
        dense = weight.detach().to(torch.float32)
        weights = elementwise_importance.detach().to(torch.float32).to(dense.device)
        weights = (weights / weights.max()).clamp_min(floor)
        up = start.up.detach().to(torch.float32).to(dense.device).clone()
        down = start.down.detach().to(torch.float32).to(dense.device).clone()
        best = weighted_objective(dense, weights, LowRankFactors(down=down, up=up))
        history = [best]
        for sweep in range(iterations):
            at_sweep_start = best
            new_up = _solve_rows(dense, weights, down, ridge)
            value = weighted_objective(dense, weights, LowRankFactors(down=down, up=new_up))
            if not value <= best:
                logger.debug("tfwsvd `%s`: A-step raised the objective at sweep %d; stopping.", name, sweep)
                break
            up, best = new_up, value
            history.append(best)
            new_down = _solve_rows(dense.T, weights.T, up.T, ridge).T.contiguous()
            value = weighted_objective(dense, weights, LowRankFactors(down=new_down, up=up))
            if not value <= best:
                logger.debug("tfwsvd `%s`: B-step raised the objective at sweep %d; stopping.", name, sweep)
                break
            down, best = new_down, value
            history.append(best)
            if at_sweep_start - best <= tolerance * at_sweep_start:
                break
    return RefinementResult(LowRankFactors(down=down, up=up), history)
