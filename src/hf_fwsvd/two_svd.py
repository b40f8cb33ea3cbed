"""SVD-LLM V2's loss-optimised truncation (Wang et al., NAACL 2025): whitening through two SVDs, no Cholesky factor.

For an ``out x in`` weight ``W`` (PyTorch layout) and the second moment ``C = E[x x^T]`` of its inputs (PSD,
``in x in``), SVD-LLM V1 whitens with a Cholesky factor of ``C``, which fails when ``C`` is not positive definite
(dead features, fewer calibration tokens than features, rounding) unless it is damped. V2 replaces it with:

1. an SVD of ``C = U_c S_c U_c^T`` (for a symmetric PSD matrix its eigendecomposition; it exists for every ``C`` and
   its values are never negative, so no damping is needed);
2. an SVD of the whitened weight ``D = W U_c S_c^{1/2} = U S V^T``, truncated to rank ``r``;
3. the map back, ``W_r = U_r S_r V_r^T S_c^{-1/2} U_c^T``: here ``up = U_r`` and
   ``down = S_r V_r^T S_c^{-1/2} U_c^T``.

Since ``D D^T = W C W^T``, the output error on the calibration inputs, ``tr((W - W_r) C (W - W_r)^T)``, is the
theoretical minimum ``sum_{k > r} s_k^2``, the discarded squared singular values of ``D`` (equal to those of
``W C^{1/2}``).

The paper writes ``S_c^{-1/2}`` and does not say what happens where ``C`` is singular; we take the pseudo-inverse:
singular values of ``C`` at or below ``in * eps(float64) * max(S_c)`` (the numerical-rank threshold in float64) count
as zero, so input directions no calibration token reached map to zero instead of to a division by zero. Both SVDs and
the map back run in float64 (always the exact SVD, whatever `svd_solver` says), the factors are returned in float32.

Relation to `hf_fwsvd.factorize` (the route of `whiten`: a Cholesky factor ``L`` of ``C / max(diag C) + 1e-12 Id``,
``up = U_r`` of ``W L``, ``down = U_r^T W``): for a positive definite ``C``, ``D`` and ``W L`` differ by an orthogonal
factor on the right, so they share ``U_r`` and both keep ``W_r = U_r U_r^T W``: the same approximation, up to
rounding. For a singular ``C`` the calibration error is the same minimum on both routes, but this one keeps
``U_r U_r^T W P`` (``P`` the projector on the seen directions) where `whiten` keeps ``U_r U_r^T W``; on an input with a
component outside the seen directions the output errors differ by ``||U_r U_r^T W (I - P) x||^2`` in `whiten`'s
favour, and when ``W C^{1/2}`` has fewer than ``r`` non-zero singular values the extra directions here are arbitrary
(they carry zero) where `whiten` fills them from the plain SVD of the rest of ``W``.
"""

from __future__ import annotations

import torch

from .factorize import LowRankFactors, validate_importance, validate_weight_and_rank

__all__ = ["two_svd_truncation"]


def two_svd_truncation(
    weight: torch.Tensor,
    rank: int,
    second_moment: torch.Tensor,
    floor: float = 0.0,
    name: str = "weight",
) -> LowRankFactors:
    """Rank-`rank` factors of `weight` by SVD-LLM V2's two-SVD truncation (see the module docstring).

    Args:
        weight (`torch.Tensor`): ``out x in`` matrix (PyTorch `nn.Linear` layout), any float dtype and device.
        rank (`int`): Kept rank, ``1 <= rank <= min(out, in)``.
        second_moment (`torch.Tensor`): The symmetric PSD ``in x in`` second moment ``C`` of the module's inputs (any
            positive scale; the scale does not change the result).
        floor (`float`, *optional*, defaults to 0): Adds ``floor * Id`` to ``C / max(diag C)``, as `importance_floor`
            does for `whiten` (0: the exact calibration-error optimum).
        name (`str`, *optional*): Module name used in error messages.

    Returns:
        [`LowRankFactors`]: float32 factors on `weight`'s device; `up` has orthonormal columns.
    """
    validate_weight_and_rank(weight, rank, name)
    if second_moment.ndim != 2:
        raise ValueError(
            f"The two-SVD truncation of `{name}` needs the in x in second moment of its inputs, got a tensor of shape "
            f"{tuple(second_moment.shape)}."
        )
    validate_importance(second_moment, weight.shape[1], name)
    with torch.no_grad():
        dense = weight.detach().to(torch.float64)
        if not torch.isfinite(dense).all():
            raise ValueError(f"`{name}` weight has NaN/Inf values; refusing to factorise it.")
        moment = second_moment.detach().to(device=dense.device, dtype=torch.float64)
        moment = (moment + moment.T) / 2
        moment = moment / moment.diagonal().max()
        if floor > 0:
            moment = moment + floor * torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
        basis, values, _ = torch.linalg.svd(moment)  # first SVD: C = U_c S_c U_c^T
        seen = values > values[0] * moment.shape[0] * torch.finfo(torch.float64).eps
        root = values.sqrt()
        inverse_root = torch.where(seen, 1 / torch.where(seen, root, torch.ones_like(root)), torch.zeros_like(root))
        left, singular, right_t = torch.linalg.svd(dense @ (basis * root), full_matrices=False)  # second SVD
        up = left[:, :rank]
        down = (singular[:rank, None] * right_t[:rank] * inverse_root) @ basis.T
    return LowRankFactors(down=down.to(torch.float32), up=up.to(torch.float32).contiguous())
