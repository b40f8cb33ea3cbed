"""Weighted low-rank factorisation of one weight matrix (pure torch, no transformers import).

FWSVD (Hsu et al., ICLR 2022) weighs the reconstruction error of ``W`` (PyTorch layout, ``out x in``) by one
importance per input feature: it minimises ``sum_i I_i * ||W[:, i] - (A B)[:, i]||^2``. With ``d = sqrt(I)`` the
optimum is the rank-``r`` SVD of ``W diag(d)`` = ``U S Vt``, giving ``A = U_r S_r`` and ``B = Vt_r diag(1/d)``.

We never divide by ``d``. For a fixed output basis ``U_r`` (orthonormal columns) every column of ``W`` is best
approximated by its orthogonal projection, whatever that column's weight, so the optimum is also
``A = U_r`` and ``B = U_r^T W`` (a least-squares solve that needs no inverse). It is identical to the textbook form
when every ``d_i > 0`` and stays finite when some importances are zero. A tiny relative floor on the importances
keeps ``W diag(d)`` from losing rank because of zero-importance columns, so those columns still act as a tie-breaker
for directions the task does not care about. Uniform importances give exactly plain SVD: the weights are normalised
by their maximum, so a constant vector becomes all ones and ``W diag(d) == W``.

The same frame covers any input-side weighting ``||(W - A B) M||_F``: `importance` may also be a symmetric
positive semi-definite ``in x in`` matrix ``C`` (e.g. the activations' second moment ``X^T X / n``), used through
``M = C^{1/2}`` (see [`input_weighting`]). Then ``||(W - A B) M||_F^2 = tr((W - A B) C (W - A B)^T)``, which is the
output error ``||(W - A B) X^T||_F^2 / n`` when ``C = X^T X / n`` (SVD-LLM's whitening): each discarded singular value
of ``W M`` squared is exactly the output error it causes. The optimum is still ``A = U_r`` (the top left singular
vectors of ``W M``) and ``B = U_r^T W``, so a rank-deficient ``C`` needs no inverse. A diagonal ``C`` is the same as
its diagonal given as a vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_IMPORTANCE_FLOOR",
    "LowRankFactors",
    "apply_weighting",
    "factorize",
    "full_rank",
    "input_scaling",
    "input_weighting",
    "low_rank_params",
    "relative_errors",
    "validate_importance",
]

DEFAULT_IMPORTANCE_FLOOR = 1e-6


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
    """Raise a `ValueError` naming `name` when an importance cannot weight a factorisation.

    Args:
        importance (`torch.Tensor`): One non-negative value per input feature, or a symmetric positive semi-definite
            ``in_features x in_features`` matrix.
        in_features (`int`): Expected length.
        name (`str`): Module name used in the error messages.
    """
    if importance.ndim == 2:
        _validate_importance_matrix(importance, in_features, name)
        return
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


def _validate_importance_matrix(matrix: torch.Tensor, in_features: int, name: str) -> None:
    if tuple(matrix.shape) != (in_features, in_features):
        raise ValueError(
            f"Importance matrix for `{name}` has shape {tuple(matrix.shape)}, expected "
            f"({in_features}, {in_features}): an input second moment of this module. Recompute the statistics for "
            "this model."
        )
    if not torch.isfinite(matrix).all():
        raise ValueError(
            f"Importance matrix for `{name}` has NaN/Inf values: the calibration activations overflowed; collect them "
            "in float32."
        )
    diagonal = matrix.diagonal()
    if (diagonal < 0).any():
        raise ValueError(f"Importance matrix for `{name}` has negative diagonal entries; it must be a second moment.")
    if not (diagonal > 0).any():
        raise ValueError(
            f"Importance matrix for `{name}` is all zeros: no calibration activation reached this module. Check the "
            "calibration data, exclude the module with `modules_to_not_convert`, or use `method='svd'`."
        )
    scale = diagonal.abs().max()
    if (matrix - matrix.T).abs().max() > 1e-4 * scale:
        raise ValueError(f"Importance matrix for `{name}` is not symmetric; it must be a second moment X^T X / n.")


def input_weighting(importance: torch.Tensor | None, floor: float = DEFAULT_IMPORTANCE_FLOOR) -> torch.Tensor | None:
    """The input-side weighting ``M`` of the objective ``||(W - A B) M||_F`` for a vector or matrix importance.

    A vector ``I`` gives the column scaling ``d = sqrt(I / max(I))`` (see [`input_scaling`]), to be applied as
    ``W * d``. A PSD matrix ``C`` gives a factor ``M`` with ``M M^T = C / max(diag C) + floor * Id`` (a Cholesky factor
    computed in float64; the relative `floor` damps a rank-deficient ``C`` so it factorises and directions no
    calibration input reached fall back to plain SVD as a tie-breaker), to be applied as ``W @ M``. Any factor with
    ``M M^T = C`` (Cholesky or symmetric square root) gives the same left singular vectors of ``W M``.

    Returns:
        `torch.Tensor` or `None`: float32 vector (length ``in``) or ``in x in`` matrix; `None` for plain SVD.
    """
    if importance is None or importance.ndim == 1:
        return input_scaling(importance, floor)
    matrix = importance.detach().to(torch.float64)
    matrix = (matrix + matrix.T) / 2
    matrix = matrix / matrix.diagonal().max()
    identity = torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
    damping = max(floor, 1e-12)
    for _ in range(8):  # fp64 Cholesky of a damped PSD matrix; raise the damping if rounding made it indefinite
        factor, info = torch.linalg.cholesky_ex(matrix + damping * identity)
        if int(info) == 0:
            return factor.to(torch.float32)
        damping *= 100
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).add(floor).sqrt()).to(torch.float32)


def apply_weighting(weight: torch.Tensor, weighting: torch.Tensor | None) -> torch.Tensor:
    """``W * d`` for a vector weighting, ``W @ M`` for a matrix one, ``W`` for `None`."""
    if weighting is None:
        return weight
    return weight * weighting if weighting.ndim == 1 else weight @ weighting


def input_scaling(importance: torch.Tensor | None, floor: float = DEFAULT_IMPORTANCE_FLOOR) -> torch.Tensor | None:
    """Turn per-input-feature importances into the column scaling ``d = sqrt(I / max(I))``, floored.

    Args:
        importance (`torch.Tensor` or `None`): Non-negative importances; `None` means uniform (plain SVD).
        floor (`float`): Relative floor applied to ``I / max(I)`` so zero-importance columns keep a tiny weight.

    Returns:
        `torch.Tensor` or `None`: float32 scaling, or `None` for plain SVD.
    """
    if importance is None:
        return None
    normalised = importance.detach().to(torch.float32) / importance.max().to(torch.float32)
    return normalised.clamp_min(floor).sqrt()


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
            the paper's ``in x out`` layout), or a PSD ``in x in`` matrix such as the activations' second moment
            (whitening, see the module docstring). `None` gives plain SVD.
        floor (`float`, *optional*, defaults to 1e-6): Relative importance floor (see module docstring).
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
        weighting = input_weighting(importance.to(dense.device) if importance is not None else None, floor)
        scaled = apply_weighting(dense, weighting)
        left, _, _ = torch.linalg.svd(scaled, full_matrices=False)
        up = left[:, :rank].contiguous()
        down = up.T @ dense
    return LowRankFactors(down=down, up=up)


def relative_errors(
    weight: torch.Tensor, approximation: torch.Tensor, importance: torch.Tensor | None = None
) -> dict[str, float]:
    """Plain and importance-weighted relative Frobenius errors of `approximation` against `weight`.

    Args:
        weight (`torch.Tensor`): ``out x in`` reference.
        approximation (`torch.Tensor`): same shape.
        importance (`torch.Tensor`, *optional*): per-input-feature importance, or a PSD ``in x in`` matrix ``C``;
            uniform when `None`.

    Returns:
        `dict`: ``{"plain": ||W - W'|| / ||W||, "weighted": ||(W - W') diag(sqrt I)|| / ||W diag(sqrt I)||}`` (for a
        matrix, ``sqrt(tr(dW C dW^T) / tr(W C W^T))``).
    """
    with torch.no_grad():
        dense = weight.detach().to(torch.float32)
        residual = dense - approximation.detach().to(torch.float32, copy=False).to(dense.device)
        plain = (residual.norm() / dense.norm().clamp_min(1e-30)).item()
        if importance is None:
            return {"plain": plain, "weighted": plain}
        if importance.ndim == 2:
            matrix = importance.detach().to(torch.float32).to(dense.device)
            numerator = ((residual @ matrix) * residual).sum().clamp_min(0).sqrt()
            denominator = ((dense @ matrix) * dense).sum().clamp_min(1e-30).sqrt()
            return {"plain": plain, "weighted": (numerator / denominator).item()}
        root = importance.detach().to(torch.float32).to(dense.device).clamp_min(0).sqrt()
        weighted = ((residual * root).norm() / (dense * root).norm().clamp_min(1e-30)).item()
    return {"plain": plain, "weighted": weighted}
