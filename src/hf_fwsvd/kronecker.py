"""Low-rank factorisation under a Kronecker-factored (two-sided) weighting (pure torch, no transformers import).

A second-order estimate of the loss increase caused by replacing ``W`` (``out x in``) with ``W'`` is
``E_t[(g_t^T (W - W') x_t)^2]`` over calibration tokens (``g_t``: the loss gradient at the layer output, ``x_t``: the
layer input). Approximating the expectation by a Kronecker product of an output factor ``G`` (``out x out``) and an
input factor ``C`` (``in x in``), as K-FAC does (Martens & Grosse, ICML 2015), gives the objective

    ``tr(G (W - W') C (W - W')^T) = ||L^T (W - W') M||_F^2``  with ``L L^T = G``, ``M M^T = C``.

Its rank-``r`` optimum is the truncated SVD of ``L^T W M`` = ``U S V^T`` mapped back:
``W' = L^{-T} U_r U_r^T L^T W``, i.e. ``up = L^{-T} U_r`` and ``down = U_r^T L^T W``. With ``G`` proportional to the
identity this is exactly the one-sided input weighting of `hf_fwsvd.factorize`.

``G`` is normalised by its largest diagonal entry and damped by `OUTPUT_DAMPING` (relative) before its float64
Cholesky factor is taken, so output directions the calibration gradients never reached still count a little (as
plain output error) and ``L^{-T}`` stays bounded. ``up`` is well conditioned anyway: for a direction of ``L^T W M``,
``L^{-T} u_k = W M v_k / s_k`` lies in the range of ``W``.

Well conditioned, but not well scaled: where the gradients are weak, ``L`` is small and ``L^{-T} U_r`` large (on
all-mpnet-base-v2 its columns had norms of 13-980 and ``down``'s rows 0.002-0.7). The product is what compression
needs, but a fine-tune moves every weight by about the same step (Adam), which is a large relative change of such a
small ``down``: the recovery fine-tune of benchmarks/headline.py took the TREC model from 73.8 to 19.6 and polarity
from 76.8 to chance. So the factors are returned as ``up = Q``, ``down = R U_r^T L^T W`` with ``Q R = L^{-T} U_r``:
the same product, an orthonormal ``up`` and ``down`` carrying the scale, as every other method's factors.
"""

from __future__ import annotations

import torch

from .factorize import (
    DEFAULT_IMPORTANCE_FLOOR,
    LowRankFactors,
    choose_svd_solver,
    input_weighting,
    output_basis,
    validate_importance,
    validate_weight_and_rank,
    weighted_matrix,
)

__all__ = ["OUTPUT_DAMPING", "kronecker_factorize", "kronecker_weighted_matrix", "output_weighting"]

# Added to the output factor G / max(diag G): output directions with less gradient energy than this share of the
# largest count as if they had this much.
OUTPUT_DAMPING = 1e-6


def output_weighting(second_moment: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """The float64 lower Cholesky factor ``L`` of ``G / max(diag G) + OUTPUT_DAMPING * Id``.

    Args:
        second_moment (`torch.Tensor`): The ``out x out`` output-gradient second moment ``G`` (PSD).
        name (`str`, *optional*): Module name used in error messages.

    Raises:
        `ValueError`: Naming the module when ``G`` is not square, not finite or all zero.
    """
    if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(
            f"Output-gradient second moment for `{name}` has shape {tuple(second_moment.shape)}, expected a square "
            "out x out matrix. Recompute the statistics for this model."
        )
    matrix = second_moment.detach().to(torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError(
            f"Output-gradient second moment for `{name}` has NaN/Inf values: the calibration loss overflowed; check "
            "the calibration data and estimate in float32."
        )
    peak = matrix.diagonal().max()
    if not peak > 0:
        raise ValueError(
            f"Output-gradient second moment for `{name}` is all zeros: the task loss has no gradient through this "
            "module. Exclude it with `modules_to_not_convert` or use a method without gradient statistics."
        )
    matrix = (matrix + matrix.T) / (2 * peak)
    identity = torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
    damping = OUTPUT_DAMPING
    for _ in range(8):  # raise the damping if float32 accumulation left the moment slightly indefinite
        factor, info = torch.linalg.cholesky_ex(matrix + damping * identity)
        if int(info) == 0:
            return factor
        damping *= 10
    raise ValueError(f"Output-gradient second moment for `{name}` is not positive semi-definite; recompute it.")


def _left_weighted(
    dense: torch.Tensor, output_second_moment: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L^T W)``: the float64 output factor of `output_weighting` and the float32 weight weighted by it."""
    left = output_weighting(output_second_moment.to(dense.device), name)
    return left, (left.T @ dense.to(torch.float64)).to(torch.float32)


def kronecker_weighted_matrix(
    weight: torch.Tensor,
    input_importance: torch.Tensor | None,
    output_second_moment: torch.Tensor,
    floor: float = DEFAULT_IMPORTANCE_FLOOR,
    name: str = "weight",
) -> torch.Tensor:
    """``L^T W M``: the float32 matrix whose squared singular values are the directions' shares of the objective."""
    _, left_weighted = _left_weighted(weight.detach().to(torch.float32), output_second_moment, name)
    return weighted_matrix(left_weighted, input_importance, floor)


def kronecker_factorize(
    weight: torch.Tensor,
    rank: int,
    input_importance: torch.Tensor | None,
    output_second_moment: torch.Tensor,
    floor: float = DEFAULT_IMPORTANCE_FLOOR,
    name: str = "weight",
    svd_solver: str = "full",
) -> LowRankFactors:
    """Best rank-`rank` factorisation of `weight` for ``||L^T (W - A B) M||_F`` (see the module docstring).

    Args:
        weight (`torch.Tensor`): ``out x in`` matrix (PyTorch `nn.Linear` layout).
        rank (`int`): Kept rank, ``1 <= rank <= min(out, in)``.
        input_importance (`torch.Tensor`, *optional*): The input factor: a PSD ``in x in`` matrix or one value per
            input feature (as in [`~hf_fwsvd.factorize.factorize`]); `None` for uniform.
        output_second_moment (`torch.Tensor`): The output factor ``G``, ``out x out`` PSD.
        floor (`float`, *optional*, defaults to 0): Relative floor of the input importance.
        name (`str`, *optional*): Module name used in error messages.
        svd_solver (`str`, *optional*, defaults to `"full"`): `"full"`, `"randomized"` or `"auto"`.

    Returns:
        [`LowRankFactors`]: float32 factors on `weight`'s device.
    """
    validate_weight_and_rank(weight, rank, name)
    if input_importance is not None:
        validate_importance(input_importance, weight.shape[1], name)
    if tuple(output_second_moment.shape) != (weight.shape[0], weight.shape[0]):
        raise ValueError(
            f"Output-gradient second moment for `{name}` has shape {tuple(output_second_moment.shape)}, expected "
            f"({weight.shape[0]}, {weight.shape[0]}) for its {tuple(weight.shape)} weight. Recompute the statistics "
            "for this model."
        )
    solver = choose_svd_solver(weight.shape, rank, svd_solver)
    with torch.no_grad():
        dense = weight.detach().to(torch.float32)
        if not torch.isfinite(dense).all():
            raise ValueError(f"`{name}` weight has NaN/Inf values; refusing to factorise it.")
        left, left_weighted = _left_weighted(dense, output_second_moment, name)
        scaling = input_weighting(input_importance.to(dense.device) if input_importance is not None else None, floor)
        basis = output_basis(left_weighted, scaling, rank, solver).to(torch.float64)
        up = torch.linalg.solve_triangular(left.T, basis, upper=True)
        down = basis.T @ left_weighted.to(torch.float64)
        # the same product with an orthonormal `up`, as every other method returns (see the module docstring)
        up, triangle = torch.linalg.qr(up)
        down = triangle @ down
    return LowRankFactors(down=down.to(torch.float32).contiguous(), up=up.to(torch.float32).contiguous())
