"""The weighted low-rank maths: exactness, special cases and the FWSVD-vs-SVD trade-off."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from hf_fwsvd import LowRankLinear, factorize
from hf_fwsvd.factorize import relative_errors


def random_matrix(out_features=24, in_features=16, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def weighted_error(weight, approximation, importance):
    return (((weight - approximation) ** 2) * importance).sum().item()


def textbook_fwsvd(weight, importance, rank):
    """The paper's formula: SVD of W diag(d), A = U_r S_r, B = Vt_r diag(1/d)."""
    d = importance.sqrt()
    u, s, vt = torch.linalg.svd(weight * d, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ (vt[:rank] / d)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20)], ids=["tall", "wide", "square"])
def test_full_rank_reproduces_weight(shape):
    weight = random_matrix(*shape)
    importance = torch.rand(shape[1], generator=torch.Generator().manual_seed(3)) + 0.1
    factors = factorize(weight, min(shape), importance)
    assert torch.allclose(factors.product(), weight, atol=1e-5)


def test_uniform_importance_is_exactly_plain_svd():
    weight = random_matrix()
    plain = factorize(weight, 5)
    uniform = factorize(weight, 5, torch.full((16,), 0.37))
    assert torch.equal(plain.up, uniform.up) and torch.equal(plain.down, uniform.down)
    u, s, vt = torch.linalg.svd(weight, full_matrices=False)
    assert torch.allclose(plain.product(), (u[:, :5] * s[:5]) @ vt[:5], atol=1e-5)


def test_matches_textbook_fwsvd_formula():
    weight = random_matrix()
    importance = torch.rand(16, generator=torch.Generator().manual_seed(1)) + 0.05
    ours = factorize(weight, 6, importance, floor=0.0).product()
    assert torch.allclose(ours, textbook_fwsvd(weight, importance, 6), atol=1e-5)


def test_fwsvd_and_svd_each_win_their_own_objective():
    weight = random_matrix(32, 32)
    importance = torch.rand(32, generator=torch.Generator().manual_seed(2)) ** 4
    fwsvd = factorize(weight, 8, importance).product()
    svd = factorize(weight, 8).product()
    assert weighted_error(weight, fwsvd, importance) < weighted_error(weight, svd, importance)
    assert (weight - svd).norm() < (weight - fwsvd).norm()
    errors = relative_errors(weight, fwsvd, importance)
    assert errors["weighted"] < relative_errors(weight, svd, importance)["weighted"]


def test_zero_importance_columns_stay_finite():
    weight = random_matrix()
    importance = torch.rand(16, generator=torch.Generator().manual_seed(4))
    importance[:5] = 0.0
    factors = factorize(weight, 4, importance)
    assert torch.isfinite(factors.up).all() and torch.isfinite(factors.down).all()
    # least squares: even zero-weight columns get the best fit in the chosen basis, never something huge
    assert factors.down.abs().max() <= weight.abs().max() * weight.shape[0]


def test_svd_runs_in_fp32_and_returns_source_dtype():
    linear = torch.nn.Linear(16, 12).to(torch.bfloat16)
    low_rank = LowRankLinear.from_linear(linear, 4, torch.rand(16) + 0.1)
    assert low_rank.up.weight.dtype == torch.bfloat16 and low_rank.down.weight.dtype == torch.bfloat16
    assert torch.equal(low_rank.up.bias, linear.bias)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_low_rank_linear_full_rank_matches_dense(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(10, 6, bias=bias)
    low_rank = LowRankLinear.from_linear(linear, 6, torch.rand(10) + 0.1)
    x = torch.randn(3, 5, 10)
    assert torch.allclose(low_rank(x), linear(x), atol=1e-5)
    assert (low_rank.in_features, low_rank.out_features, low_rank.rank) == (10, 6, 6)
    assert "rank=6" in repr(low_rank)
    dense = low_rank.to_linear()
    assert isinstance(dense, torch.nn.Linear) and torch.allclose(dense(x), linear(x), atol=1e-5)
    assert not any(name.endswith("weight") and name.count(".") == 0 for name, _ in low_rank.named_parameters())
    assert set(low_rank.state_dict()) == {"down.weight", "up.weight"} | ({"up.bias"} if bias else set())


def test_conv1d_is_factorised_in_linear_layout():
    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # GPT-2 layout: weight is in x out
    torch.nn.init.normal_(conv.bias)
    low_rank = LowRankLinear.from_linear(conv, 6)
    x = torch.randn(2, 4, 10)
    assert torch.allclose(low_rank(x), conv(x), atol=1e-5)


@pytest.mark.parametrize(
    ("rank", "message"),
    [(0, "out of range"), (-1, "out of range"), (17, "out of range"), (2.0, "must be an int")],
    ids=["zero", "negative", "too-large", "float"],
)
def test_bad_rank_raises(rank, message):
    with pytest.raises(ValueError, match=message):
        factorize(random_matrix(), rank)


@pytest.mark.parametrize(
    ("importance", "message"),
    [
        (torch.full((16,), float("nan")), "NaN/Inf"),
        (torch.zeros(16), "all zeros"),
        (torch.ones(15), "expected \\(16,\\)"),
        (-torch.ones(16), "negative"),
    ],
    ids=["nan", "zeros", "shape", "negative"],
)
def test_bad_importance_raises_naming_module(importance, message):
    with pytest.raises(ValueError, match=message) as error:
        factorize(random_matrix(), 4, importance, name="encoder.layer.0.query")
    assert "encoder.layer.0.query" in str(error.value)
