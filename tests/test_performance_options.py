"""The performance knobs: randomized SVD solver, the low-rank pay-off rule and its use in rank resolution."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_bert

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.factorize import choose_svd_solver, factorize, left_singular_basis, relative_errors
from hf_fwsvd.payoff import flop_ratio, low_rank_pays_off, max_paying_rank
from hf_fwsvd.ranks import resolve_ranks


def _low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(cols, rank, generator=generator))[0]
    scales = torch.linspace(10.0, 1.0, rank)
    return left * scales @ right.T + noise * torch.randn(rows, cols, generator=generator)


def test_randomized_solver_is_close_to_exact_on_low_rank_plus_noise():
    weight = _low_rank_plus_noise(120, 80, rank=10, noise=0.01)
    importance = torch.rand(80, generator=torch.Generator().manual_seed(1)) + 0.1
    exact = factorize(weight, 10, importance, svd_solver="full")
    fast = factorize(weight, 10, importance, svd_solver="randomized")
    exact_error = relative_errors(weight, exact.product(), importance)["weighted"]
    fast_error = relative_errors(weight, fast.product(), importance)["weighted"]
    assert fast_error <= exact_error * 1.001
    torch.testing.assert_close(fast.product(), exact.product(), rtol=0, atol=1e-3)
    # the same subspace: projector onto the randomized basis equals the exact one
    torch.testing.assert_close(fast.up @ fast.up.T, exact.up @ exact.up.T, rtol=0, atol=1e-4)


def test_randomized_solver_is_deterministic_and_leaves_global_rng_alone():
    weight = _low_rank_plus_noise(60, 50, rank=8, noise=0.1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = left_singular_basis(weight, 5, "randomized")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(left_singular_basis(weight, 5, "randomized"), first)


def test_full_solver_is_plain_svd():
    weight = torch.randn(30, 20, generator=torch.Generator().manual_seed(2))
    left, _, _ = torch.linalg.svd(weight, full_matrices=False)
    factors = factorize(weight, 7, svd_solver="full")
    assert torch.equal(factors.up, left[:, :7].contiguous())
    assert torch.equal(factorize(weight, 7).up, factors.up)  # "full" is factorize's default


@pytest.mark.parametrize(
    ("shape", "rank", "expected"),
    [
        ((384, 1536), 96, "full"),
        ((4096, 4096), 1024, "randomized"),
        ((4096, 4096), 1025, "full"),
        ((2048, 8192), 512, "randomized"),
        ((1023, 4096), 100, "full"),
    ],
    ids=["small", "big-low-rank", "big-high-rank", "wide", "just-below-min-side"],
)
def test_auto_solver_rule(shape, rank, expected):
    assert choose_svd_solver(shape, rank, "auto") == expected
    assert choose_svd_solver(shape, rank, "full") == "full"


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match="Unknown svd_solver 'lanczos'; choose one of auto, full, randomized."):
        FWSVDConfig(svd_solver="lanczos")
    with pytest.raises(ValueError, match="Unknown svd_solver 'lanczos'"):
        factorize(torch.randn(4, 4), 2, svd_solver="lanczos")


def test_svd_solver_reaches_factorisation_through_compress():
    torch.manual_seed(0)
    model = tiny_bert()
    reference = {
        name: module.weight.detach().clone() for name, module in model.named_modules() if name.endswith("query")
    }
    compress(model, FWSVDConfig(rank=4, method="svd", svd_solver="randomized"), show_progress=False)
    for name, weight in reference.items():
        expected = factorize(weight, 4, svd_solver="randomized")
        assert torch.equal(model.get_submodule(name).up.weight, expected.up)
    assert model.config.quantization_config.to_dict()["svd_solver"] == "randomized"


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536), (7, 5), (2, 2)], ids=str)
@pytest.mark.parametrize("efficiency", [1.0, 0.8, 0.5])
def test_max_paying_rank_is_the_boundary(shape, efficiency):
    out_features, in_features = shape
    best = max_paying_rank(out_features, in_features, efficiency)
    assert 0 <= best < min(shape)
    if best:
        assert low_rank_pays_off(out_features, in_features, best, efficiency)
    if best + 1 < min(shape):
        assert not low_rank_pays_off(out_features, in_features, best + 1, efficiency)


def test_pay_off_rule_values():
    assert flop_ratio(384, 384, 192) == 1.0
    assert not low_rank_pays_off(384, 384, 192, efficiency=1.0)
    assert low_rank_pays_off(384, 384, 191, efficiency=1.0)
    assert max_paying_rank(384, 384, 0.8) == 153  # 0.8 * 384 * 384 / 768 = 153.6
    with pytest.raises(ValueError, match=r"`efficiency` must be in \(0, 1\], got 0"):
        low_rank_pays_off(4, 4, 1, efficiency=0)


def test_rank_resolution_warns_about_slow_ranks(caplog):
    shapes = {"a.query": (384, 384), "a.intermediate": (1536, 384)}
    with caplog.at_level(logging.WARNING, logger="hf_fwsvd.ranks"):
        ranks = resolve_ranks(shapes, FWSVDConfig(rank_ratio=0.5))
    assert ranks == {"a.query": 192, "a.intermediate": 192}  # explicit ratios are honoured...
    assert (
        "1 module(s) get a rank too high to run faster than the dense layer, e.g. `a.query` (384x384) at rank 192"
        in (caplog.text)
    )  # ...but the user is told
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_fwsvd.ranks"):
        resolve_ranks(shapes, FWSVDConfig(rank_ratio=0.25))
    assert caplog.text == ""


def test_param_ratio_clamps_to_ranks_that_pay_off():
    shapes = {"a.query": (384, 384), "a.intermediate": (1536, 384)}
    assert resolve_ranks(shapes, FWSVDConfig(param_ratio=0.5)) == {"a.query": 96, "a.intermediate": 153}
    assert resolve_ranks(shapes, FWSVDConfig(param_ratio=0.95)) == {"a.query": 153, "a.intermediate": 245}


def test_report_flags_slow_modules():
    torch.manual_seed(0)
    model = tiny_bert()
    compress(model, FWSVDConfig(rank=8, method="svd"), show_progress=False)  # 16x16 at rank 8: no saving
    report = model.fwsvd_report
    by_name = {row.name: row for row in report.modules}
    assert not by_name["bert.encoder.layer.0.attention.self.query"].pays_off
    assert by_name["bert.encoder.layer.0.intermediate.dense"].pays_off  # 32x16 at rank 8: 0.75 < 0.8
    assert "  slow" in report.format_table()
