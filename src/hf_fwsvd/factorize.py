"""Weighted low-rank factorisation of one weight matrix (pure torch, no transformers import).

FWSVD (Hsu et al., ICLR 2022) weighs the reconstruction error of ``W`` (PyTorch layout, ``out x in``) by one
importance per input feature: it minimises ``sum_i I_i * ||W[:, i] - (A B)[:, i]||^2``. With ``d = sqrt(I)`` the
optimum is the rank-``r`` SVD of ``W diag(d)`` = ``U S Vt``, giving ``A = U_r S_r`` and ``B = Vt_r diag(1/d)``.

We never divide by ``d``. For a fixed output basis ``U_r`` (orthonormal columns) every column of ``W`` is best
approximated by its orthogonal projection, whatever that column's weight, so the optimum is also
``A = U_r`` and ``B = U_r^T W`` (a least-squares solve that needs no inverse). It is identical to the textbook form
when every ``d_i > 0`` and stays finite when some importances are zero.

Zero importances need no floor. When ``W diag(d)`` has (numerical) rank ``k < r``, its ``k`` leading directions already
make the weighted error zero, and the other ``r - k`` directions are free: we take them from the plain SVD of what
those ``k`` leave of ``W``, so zero-importance columns are still approximated as well as possible without costing any
weighted error. The result is exactly the weighted optimum (Eckart-Young on ``W diag(d)``) for every importance
vector; a relative floor (``floor > 0``) is available but trades that optimality for plain error, so it is off by
default. Uniform importances give exactly plain SVD (the SVD of ``W`` itself). Only the ratios of the ``d_i`` matter,
so they are formed in float64 and scaled so that the largest weighted entry is one before the float32 SVD: importances
spanning more orders of magnitude than float32 holds neither overflow nor underflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_IMPORTANCE_FLOOR",
    "LowRankFactors",
    "factorize",
    "full_rank",
    "input_scaling",
    "low_rank_params",
    "relative_errors",
    "validate_importance",
]

DEFAULT_IMPORTANCE_FLOOR = 0.0


@dataclass
class LowRankFactors:
    """The two factors of a rank-``r`` approximation ``W ~= up @ down``.

    Args:
        down (`torch.Tensor`): ``rank x in_features``, applied first.
        up (`torch.Tensor`): ``out_features x rank``, applied second.
    """

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def product(self) -> torch.Tensor:
        return self.up @ self.down


def full_rank(weight_shape: tuple[int, int] | torch.Size) -> int:
    """The largest rank of a matrix of this shape."""
    return min(int(weight_shape[0]), int(weight_shape[1]))


def low_rank_params(out_features: int, in_features: int, rank: int) -> int:
    """Weight parameters of the factorised form (bias excluded)."""
    return rank * (out_features + in_features)


def validate_importance(importance: torch.Tensor, in_features: int, name: str = "weight") -> None:
    """Raise a `ValueError` naming `name` when an importance vector cannot weight a factorisation.

    Args:
        importance (`torch.Tensor`): One non-negative value per input feature.
        in_features (`int`): Expected length.
        name (`str`): Module name used in the error messages.
    """
    if importance.ndim != 1 or importance.shape[0] != in_features:
        raise ValueError(
            f"Importance for `{name}` has shape {tuple(importance.shape)}, expected ({in_features},): one value per "
            "input feature. Recompute the Fisher importances for this model."
        )
    if not torch.isfinite(importance).all():
        bad = int((~torch.isfinite(importance)).sum())
        raise ValueError(
            f"Importance for `{name}` has {bad} NaN/Inf values. The calibration loss was probably NaN/Inf; check the "
            "calibration data (labels in range, no empty texts) and the model dtype (estimate in float32)."
        )
    if (importance < 0).any():
        raise ValueError(f"Importance for `{name}` has negative values; Fisher importances are sums of squares.")
    if not (importance > 0).any():
        raise ValueError(
            f"Importance for `{name}` is all zeros: the task loss has no gradient through this module. Exclude it "
            "with `modules_to_not_convert`, use `method='svd'`, or check that the calibration data reaches it."
        )


def input_scaling(importance: torch.Tensor | None, floor: float = DEFAULT_IMPORTANCE_FLOOR) -> torch.Tensor | None:
    """Turn per-input-feature importances into the column scaling ``d = sqrt(I / max(I))``, floored.

    Args:
        importance (`torch.Tensor` or `None`): Non-negative importances; `None` means uniform (plain SVD).
        floor (`float`): Relative floor applied to ``I / max(I)`` (0: none, the exact weighted optimum).

    Returns:
        `torch.Tensor` or `None`: float32 scaling, or `None` for plain SVD.
    """
    if importance is None:
        return None
    values = importance.detach().to(torch.float64)  # float64 first: a float32 cast could overflow or underflow
    return (values / values.max()).clamp_min(floor).sqrt().to(torch.float32)


def _column_factors(dense: torch.Tensor, importance: torch.Tensor, floor: float) -> torch.Tensor | None:
    """float32 column factors proportional to ``sqrt(I / max I)`` for the SVD, or `None` for uniform importances.

    Only the ratios between factors matter (a common scale does not change the left singular vectors), so they are
    scaled in float64 to make the largest weighted entry of ``W`` one: importances spanning more orders of magnitude
    than float32 holds still weigh the columns that carry weight instead of underflowing to zero.
    """
    values = importance.detach().to(device=dense.device, dtype=torch.float64)
    weights = (values / values.max()).clamp_min(floor)
    if bool((weights == 1).all()):
        return None  # uniform importances: plain SVD, bit for bit
    roots = weights.sqrt()
    peak = (dense.abs().amax(dim=0).to(torch.float64) * roots).max()
    if peak > 0:
        roots = roots / peak
    return roots.clamp(max=torch.finfo(torch.float32).max).to(torch.float32)


def _output_basis(dense: torch.Tensor, scaling: torch.Tensor | None, rank: int) -> torch.Tensor:
    """Orthonormal ``out x rank`` basis: the top left singular vectors of ``W diag(d)``, completed from the plain SVD
    of the rest of ``W`` when ``W diag(d)`` has fewer than `rank` (numerically) non-zero singular values."""
    scaled = dense if scaling is None else dense * scaling
    left, singular, _ = torch.linalg.svd(scaled, full_matrices=False)
    if scaling is None:
        return left[:, :rank]
    tolerance = singular[0] * max(scaled.shape) * torch.finfo(torch.float32).eps
    kept = int((singular > tolerance).sum()) if singular[0] > 0 else 0
    if kept >= rank:
        return left[:, :rank]
    basis = left[:, :kept]
    rest, _, _ = torch.linalg.svd(dense - basis @ (basis.T @ dense), full_matrices=False)
    # QR keeps the span of `basis` first and makes the completion orthonormal even where `rest` is degenerate.
    orthonormal, _ = torch.linalg.qr(torch.cat([basis, rest[:, : rank - kept]], dim=1))
    return orthonormal


def factorize(
    weight: torch.Tensor,
    rank: int,
    importance: torch.Tensor | None = None,
    floor: float = DEFAULT_IMPORTANCE_FLOOR,
    name: str = "weight",
) -> LowRankFactors:
    """Best rank-`rank` factorisation of `weight` under per-input-feature importance weighting.

    Args:
        weight (`torch.Tensor`): ``out x in`` matrix (PyTorch `nn.Linear` layout), any float dtype and device.
        rank (`int`): Kept rank, ``1 <= rank <= min(out, in)``.
        importance (`torch.Tensor`, *optional*): One non-negative value per input feature (FWSVD's row importance in
            the paper's ``in x out`` layout). `None` gives plain SVD.
        floor (`float`, *optional*, defaults to 0): Relative importance floor (see module docstring).
        name (`str`, *optional*): Module name used in error messages.

    Returns:
        [`LowRankFactors`]: float32 factors on `weight`'s device (callers cast them back).
    """
    if weight.ndim != 2:
        raise ValueError(f"`{name}` weight must be 2-D, got shape {tuple(weight.shape)}.")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"Rank for `{name}` must be an int, got {rank!r}.")
    if not 1 <= rank <= full_rank(weight.shape):
        raise ValueError(
            f"Rank {rank} for `{name}` is out of range: a {tuple(weight.shape)} weight allows ranks 1.."
            f"{full_rank(weight.shape)}."
        )
    if importance is not None:
        validate_importance(importance, weight.shape[1], name)
    with torch.no_grad():
        dense = weight.detach().to(torch.float32)
        if not torch.isfinite(dense).all():
            raise ValueError(f"`{name}` weight has NaN/Inf values; refusing to factorise it.")
        scaling = None if importance is None else _column_factors(dense, importance, floor)
        up = _output_basis(dense, scaling, rank).contiguous()
        down = up.T @ dense
    return LowRankFactors(down=down, up=up)


def relative_errors(
    weight: torch.Tensor, approximation: torch.Tensor, importance: torch.Tensor | None = None
) -> dict[str, float]:
    """Plain and importance-weighted relative Frobenius errors of `approximation` against `weight`.

    Args:
        weight (`torch.Tensor`): ``out x in`` reference.
        approximation (`torch.Tensor`): same shape.
        importance (`torch.Tensor`, *optional*): per-input-feature importance; uniform when `None`.

    Returns:
        `dict`: ``{"plain": ||W - W'|| / ||W||, "weighted": ||(W - W') diag(sqrt I)|| / ||W diag(sqrt I)||}``.
    """
    with torch.no_grad():
        dense = weight.detach().to(torch.float32)
        residual = dense - approximation.detach().to(torch.float32, copy=False).to(dense.device)
        plain = (residual.norm() / dense.norm().clamp_min(1e-30)).item()
        if importance is None:
            return {"plain": plain, "weighted": plain}
        root = importance.detach().to(torch.float32).to(dense.device).clamp_min(0).sqrt()
        weighted = ((residual * root).norm() / (dense * root).norm().clamp_min(1e-30)).item()
    return {"plain": plain, "weighted": weighted}
