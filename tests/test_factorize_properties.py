"""Property-based checks of the weighted factorisation over random shapes, ranks, dtypes, scales and importances."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_fwsvd.factorize import factorize, full_rank

SETTINGS = settings(
    max_examples=int(os.environ.get("HF_FWSVD_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def problems(draw):
    """A weight matrix (possibly rank-deficient, with zero columns, at any scale), a rank and importances."""
    out_features = draw(st.integers(1, 12))
    in_features = draw(st.integers(1, 12))
    rank = draw(st.integers(1, full_rank((out_features, in_features))))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    inner = draw(st.one_of(st.none(), st.integers(1, 12)))  # a low-rank weight
    if inner is not None:
        weight = torch.randn(out_features, inner, generator=generator, dtype=torch.float64) @ torch.randn(
            inner, in_features, generator=generator, dtype=torch.float64
        )
    column_scales = torch.tensor(
        draw(st.lists(st.sampled_from([0.0, 1e-3, 1.0, 1e3]), min_size=in_features, max_size=in_features)),
        dtype=torch.float64,
    )
    scale = draw(st.sampled_from([1e-4, 1.0, 1e4]))
    weight = weight * column_scales * scale
    if dtype == torch.float16 and weight.abs().max() > 1e4:  # stay inside float16's range
        weight = weight / weight.abs().max() * 1e4
    weight = weight.to(dtype)
    importance_dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    values = [0.0, 1e-30, 1e-6, 0.5, 1.0, 7.0, 1e6, 1e30]
    if importance_dtype == torch.float64:
        values.append(1e300)  # finite in float64, inf if cast to float32 before normalising
    importance_values = draw(st.lists(st.sampled_from(values), min_size=in_features, max_size=in_features))
    if not any(importance_values):
        importance_values[0] = 1.0
    importance = torch.tensor(importance_values, dtype=importance_dtype)
    return weight, rank, importance


def weighted_objective(weight: torch.Tensor, approximation: torch.Tensor, importance: torch.Tensor) -> float:
    """FWSVD's objective ``sum_i I_i ||W[:, i] - A[:, i]||^2``, in float64 with importances normalised by their max."""
    weights = importance.to(torch.float64) / importance.to(torch.float64).max()
    residual = weight.to(torch.float64) - approximation.to(torch.float64)
    return float((residual.square().sum(0) * weights).sum())


def weighted_norm(weight: torch.Tensor, importance: torch.Tensor) -> float:
    return weighted_objective(weight, torch.zeros_like(weight, dtype=torch.float64), importance)


@SETTINGS
@given(problems())
def test_factors_are_finite_fp32_and_shaped(problem):
    weight, rank, importance = problem
    for factors in (factorize(weight, rank, importance), factorize(weight, rank)):
        assert factors.down.shape == (rank, weight.shape[1]) and factors.up.shape == (weight.shape[0], rank)
        assert factors.down.dtype == factors.up.dtype == torch.float32
        assert torch.isfinite(factors.down).all() and torch.isfinite(factors.up).all()


@SETTINGS
@given(problems())
def test_full_rank_reconstructs_exactly(problem):
    weight, _, importance = problem
    rank = full_rank(weight.shape)
    reference = weight.to(torch.float32)
    tolerance = 1e-4 * float(reference.abs().max()) + 1e-30
    for product in (factorize(weight, rank, importance).product(), factorize(weight, rank).product()):
        assert float((product - reference).abs().max()) <= tolerance


@SETTINGS
@given(problems())
def test_weighted_error_never_above_plain_svd(problem):
    weight, rank, importance = problem
    reference = weight.to(torch.float32)
    fwsvd = weighted_objective(reference, factorize(weight, rank, importance).product(), importance)
    plain = weighted_objective(reference, factorize(weight, rank).product(), importance)
    # float32 SVD: allow rounding relative to the weighted size of W, nothing more
    assert fwsvd <= plain + 1e-5 * weighted_norm(reference, importance)


@SETTINGS
@given(problems())
def test_uniform_importance_is_plain_svd(problem):
    weight, rank, importance = problem
    uniform = torch.full_like(importance, 3.0)
    reference = weight.to(torch.float32)
    ones = torch.ones_like(importance)
    weighted = weighted_objective(reference, factorize(weight, rank, uniform).product(), ones)
    plain = weighted_objective(reference, factorize(weight, rank).product(), ones)
    assert abs(weighted - plain) <= 1e-5 * weighted_norm(reference, ones)


@SETTINGS
@given(problems())
def test_weighted_error_is_the_eckart_young_optimum(problem):
    """The weighted error equals the sum of the squared tail singular values of ``W diag(sqrt(I / max I))``: the
    smallest any rank-``r`` matrix can reach (computed independently, in float64)."""
    weight, rank, importance = problem
    reference = weight.to(torch.float32)
    weights = importance.to(torch.float64) / importance.to(torch.float64).max()
    singular = torch.linalg.svdvals(reference.to(torch.float64) * weights.sqrt())
    optimum = float(singular[rank:].square().sum())
    fwsvd = weighted_objective(reference, factorize(weight, rank, importance).product(), importance)
    assert optimum - 1e-5 * weighted_norm(reference, importance) <= fwsvd  # below it only by rounding
    assert fwsvd <= optimum + 1e-5 * weighted_norm(reference, importance)
