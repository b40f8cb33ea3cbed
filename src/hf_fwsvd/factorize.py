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

The same frame covers any input-side weighting ``||(W - A B) M||_F``: `importance` may also be a symmetric
positive semi-definite ``in x in`` matrix ``C`` (e.g. the activations' second moment ``X^T X / n``), used through a
factor ``M`` with ``M M^T = C`` (see [`input_weighting`]). Then ``||(W - A B) M||_F^2 = tr((W - A B) C (W - A B)^T)``,
which is the output error ``||(W - A B) X^T||_F^2 / n`` when ``C = X^T X / n`` (SVD-LLM's whitening): each discarded
singular value of ``W M`` squared is exactly the output error it causes. The optimum is still ``A = U_r`` (the top
left singular vectors of ``W M``) and ``B = U_r^T W``, so a rank-deficient ``C`` needs no inverse; its unseen
directions are completed from the plain SVD of the rest of ``W``, as for zero importances. A diagonal ``C`` is the
same as its diagonal given as a vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_IMPORTANCE_FLOOR",
    "SVD_SOLVERS",
    "LowRankFactors",
    "apply_weighting",
    "choose_svd_solver",
    "factorize",
    "full_rank",
    "input_scaling",
    "input_weighting",
    "left_singular_basis",
    "low_rank_params",
    "output_basis",
    "relative_errors",
    "representable_factors",
    "validate_importance",
    "weighted_matrix",
]

DEFAULT_IMPORTANCE_FLOOR = 0.0
SVD_SOLVERS = ("auto", "full", "randomized")
# Randomized range finder settings: extra sampled directions and power iterations (Halko, Martinsson & Tropp 2011).
RANDOMIZED_OVERSAMPLE = 16
RANDOMIZED_POWER_ITERATIONS = 4
# "auto" uses the randomized solver where benchmarks/bench_factorize.py measured it 2-5x faster than the exact SVD
# (which then costs seconds per matrix) at an extra weighted error below 1% (relative): matrices whose smaller side is
# at least AUTO_RANDOMIZED_MIN_SIDE, at ranks up to AUTO_RANDOMIZED_MAX_RANK_FRACTION of it.
AUTO_RANDOMIZED_MIN_SIDE = 1024
AUTO_RANDOMIZED_MAX_RANK_FRACTION = 0.25


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


def validate_weight_and_rank(weight: torch.Tensor, rank: int, name: str = "weight") -> None:
    """Raise a `ValueError` naming `name` unless `weight` is 2-D and ``1 <= rank <= min(out, in)`` is an int."""
    if weight.ndim != 2:
        raise ValueError(f"`{name}` weight must be 2-D, got shape {tuple(weight.shape)}.")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"Rank for `{name}` must be an int, got {rank!r}.")
    if not 1 <= rank <= full_rank(weight.shape):
        raise ValueError(
            f"Rank {rank} for `{name}` is out of range: a {tuple(weight.shape)} weight allows ranks 1.."
            f"{full_rank(weight.shape)}."
        )


def low_rank_params(out_features: int, in_features: int, rank: int) -> int:
    """Weight parameters of the factorised form (bias excluded)."""
    return rank * (out_features + in_features)


def validate_importance(
    importance: torch.Tensor, in_features: int, name: str = "weight", matrix_ok: bool = True
) -> None:
    """Raise a `ValueError` naming `name` when an importance cannot weight a factorisation.

    Args:
        importance (`torch.Tensor`): One non-negative value per input feature, or a symmetric positive semi-definite
            ``in_features x in_features`` matrix.
        in_features (`int`): Expected length.
        name (`str`): Module name used in the error messages.
        matrix_ok (`bool`, *optional*, defaults to `True`): Accept a matrix (`False` for Fisher row importances).
    """
    if importance.ndim == 2 and matrix_ok:
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


def input_weighting(importance: torch.Tensor | None, floor: float = DEFAULT_IMPORTANCE_FLOOR) -> torch.Tensor | None:
    """The input-side weighting ``M`` of the objective ``||(W - A B) M||_F`` for a vector or matrix importance.

    A vector ``I`` gives the column scaling ``d = sqrt(I / max(I))`` (see [`input_scaling`]), to be applied as
    ``W * d``. A PSD matrix ``C`` gives a factor ``M`` with ``M M^T = C / max(diag C) + floor * Id`` (a Cholesky factor
    computed in float64; a tiny damping makes a rank-deficient ``C`` factorise, and [`factorize`] completes the
    directions no calibration input reached from the plain SVD), to be applied as ``W @ M``. Any factor with
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


def weighted_matrix(weight: torch.Tensor, importance: torch.Tensor | None, floor: float) -> torch.Tensor:
    """``W M`` in float32 for the importance's weighting (the matrix whose singular values rank the directions)."""
    dense = weight.detach().to(torch.float32)
    weighting = input_weighting(importance.to(dense.device) if importance is not None else None, floor)
    return apply_weighting(dense, weighting)


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


def output_basis(dense: torch.Tensor, scaling: torch.Tensor | None, rank: int, solver: str = "full") -> torch.Tensor:
    """Orthonormal ``out x rank`` basis: the top left singular vectors of ``W M`` (``M = diag(d)`` for a vector
    scaling, a matrix factor otherwise), completed from the plain SVD of the rest of ``W`` when ``W M`` has fewer than
    `rank` (numerically) non-zero singular values. `solver` is ``"full"`` or ``"randomized"``."""
    scaled = apply_weighting(dense, scaling)
    if solver == "randomized":
        left, singular = _randomized_left(scaled, rank)
    else:
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


def choose_svd_solver(shape: tuple[int, int] | torch.Size, rank: int, solver: str = "auto") -> str:
    """Resolve `solver` (``"auto"``, ``"full"`` or ``"randomized"``) to the solver used for this shape and rank.

    ``"auto"`` picks ``"randomized"`` only for matrices whose smaller side is at least `AUTO_RANDOMIZED_MIN_SIDE` at
    ranks up to `AUTO_RANDOMIZED_MAX_RANK_FRACTION` of it, where we measured it faster with a negligible extra
    weighted error (< 1% relative); everything else uses the exact SVD.
    """
    if solver not in SVD_SOLVERS:
        raise ValueError(f"Unknown svd_solver {solver!r}; choose one of {', '.join(SVD_SOLVERS)}.")
    if solver != "auto":
        return solver
    side = full_rank(shape)
    if side >= AUTO_RANDOMIZED_MIN_SIDE and rank <= AUTO_RANDOMIZED_MAX_RANK_FRACTION * side:
        return "randomized"
    return "full"


def _randomized_left(
    matrix: torch.Tensor,
    rank: int,
    oversample: int = RANDOMIZED_OVERSAMPLE,
    power_iterations: int = RANDOMIZED_POWER_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate leading left singular vectors and values (``rank + oversample`` of them) of `matrix`: a seeded
    randomized range finder with power iterations (Halko, Martinsson & Tropp 2011), deterministic, and the global RNG
    is left untouched."""
    rows, cols = matrix.shape
    sketch = min(rank + oversample, rows, cols)
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(cols, sketch, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ probe)
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    small_left, singular, _ = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ small_left, singular


def left_singular_basis(matrix: torch.Tensor, rank: int, solver: str = "full") -> torch.Tensor:
    """The top-`rank` left singular vectors of a float32 `matrix` (``m x rank``, orthonormal columns).

    Args:
        matrix (`torch.Tensor`): ``m x n`` float32 matrix.
        rank (`int`): Number of singular vectors.
        solver (`str`, *optional*, defaults to `"full"`): `"full"` (exact `torch.linalg.svd`) or `"randomized"` (a
            seeded randomized range finder with power iterations: deterministic, and the global RNG is untouched).
    """
    if solver == "full":
        left, _, _ = torch.linalg.svd(matrix, full_matrices=False)
        return left[:, :rank]
    if solver != "randomized":
        raise ValueError(f"Unknown svd_solver {solver!r}; choose 'full' or 'randomized' (or 'auto' in factorize).")
    return _randomized_left(matrix, rank)[0][:, :rank]


def factorize(
    weight: torch.Tensor,
    rank: int,
    importance: torch.Tensor | None = None,
    floor: float = DEFAULT_IMPORTANCE_FLOOR,
    name: str = "weight",
    svd_solver: str = "full",
) -> LowRankFactors:
    """Best rank-`rank` factorisation of `weight` under per-input-feature importance weighting.

    Args:
        weight (`torch.Tensor`): ``out x in`` matrix (PyTorch `nn.Linear` layout), any float dtype and device.
        rank (`int`): Kept rank, ``1 <= rank <= min(out, in)``.
        importance (`torch.Tensor`, *optional*): One non-negative value per input feature (FWSVD's row importance in
            the paper's ``in x out`` layout), or a PSD ``in x in`` matrix such as the activations' second moment
            (whitening, see the module docstring). `None` gives plain SVD.
        floor (`float`, *optional*, defaults to 0): Relative importance floor (see module docstring).
        name (`str`, *optional*): Module name used in error messages.
        svd_solver (`str`, *optional*, defaults to `"full"`): `"full"` (exact SVD), `"randomized"` (randomized range
            finder, see [`left_singular_basis`]) or `"auto"` (see [`choose_svd_solver`]).

    Returns:
        [`LowRankFactors`]: float32 factors on `weight`'s device (callers cast them back).
    """
    validate_weight_and_rank(weight, rank, name)
    if importance is not None:
        validate_importance(importance, weight.shape[1], name)
    solver = choose_svd_solver(weight.shape, rank, svd_solver)
    with torch.no_grad():
        dense = weight.detach().to(torch.float32)
        if not torch.isfinite(dense).all():
            raise ValueError(f"`{name}` weight has NaN/Inf values; refusing to factorise it.")
        if importance is None:
            scaling = None
        elif importance.ndim == 1:
            scaling = _column_factors(dense, importance, floor)
        else:
            scaling = input_weighting(importance.to(dense.device), floor)
        up = output_basis(dense, scaling, rank, solver).contiguous()
        down = up.T @ dense
    return LowRankFactors(down=down, up=up)


def representable_factors(factors: LowRankFactors, dtype: torch.dtype, name: str = "weight") -> LowRankFactors:
    """`factors` made safe to store in `dtype` (float16/bfloat16): unchanged when they fit, else rebalanced.

    `factorize` returns an orthonormal `up` and a `down` carrying the singular values, so `down` can exceed float16's
    range (65504) although the layer's weight fits in it. Rebalancing moves ``sqrt(s_k)`` of each component's scale
    ``s_k = ||down_k||`` into `up` (``up_k * sqrt(s_k)``, ``down_k / sqrt(s_k)``): the product is unchanged and both
    factors hold about the square root of the largest singular value, so a representable layer stays representable.

    Raises:
        `ValueError`: Naming the module when even the rebalanced factors overflow `dtype`.
    """
    if not dtype.is_floating_point or torch.finfo(dtype).bits > 16:
        return factors
    limit = torch.finfo(dtype).max
    if max(float(factors.down.abs().max()), float(factors.up.abs().max())) < limit:
        return factors
    with torch.no_grad():
        scale = (factors.down.norm(dim=1) / factors.up.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
        balanced = LowRankFactors(down=factors.down / scale[:, None], up=factors.up * scale[None, :])
    peak = max(float(balanced.down.abs().max()), float(balanced.up.abs().max()))
    if peak >= limit:
        raise ValueError(
            f"The factors of `{name}` cannot be stored in {str(dtype).removeprefix('torch.')}: even with its singular "
            f"values balanced between `up` and `down` the largest entry is {peak:.3g}, above the dtype's maximum "
            f"{limit:.3g}. Compress the model in float32 (`model.float()`) or bfloat16, or exclude the module."
        )
    return balanced


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
