"""The kfac screen's variants change exactly the damping of G or the allocation's spectrum, and are undone on exit."""

from __future__ import annotations

import pytest
import torch

import hf_fwsvd.kronecker as kronecker
from benchmarks.kfac_screen import kfac_variant
from hf_fwsvd import FWSVDConfig
from hf_fwsvd.factorize import factorize
from hf_fwsvd.methods import get_method
from hf_fwsvd.pipeline import budget_ranks
from hf_fwsvd.statistics import Statistics


class Config:
    importance_floor, svd_solver = 0.0, "full"


def moment(size: int, seed: int) -> torch.Tensor:
    rows = torch.randn(50, size, generator=torch.Generator().manual_seed(seed))
    return rows.T @ rows / 50


def test_large_damping_approaches_fisher_whiten_and_is_restored_after_an_error():
    weight = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    input_moment, output_moment = moment(5, 1), torch.diag(torch.tensor([1.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]))
    one_sided = factorize(weight, 2, input_moment).product()
    default = kronecker.kronecker_factorize(weight, 2, input_moment, output_moment).product()
    with pytest.raises(RuntimeError, match="boom"), kfac_variant(output_damping=1e6):
        damped = kronecker.kronecker_factorize(weight, 2, input_moment, output_moment).product()
        assert torch.allclose(damped, one_sided, atol=1e-4)
        raise RuntimeError("boom")
    assert kronecker.OUTPUT_DAMPING == 1e-6
    assert not torch.allclose(default, one_sided, atol=1e-2)
    assert torch.equal(kronecker.kronecker_factorize(weight, 2, input_moment, output_moment).product(), default)


def test_two_sided_allocation_scores_l_w_m_and_is_undone():
    method = get_method("kfac_whiten")
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    stats = {"gradient_second_moment": {"m": moment(4, 3)}, "output_gradient_second_moment": {"m": moment(6, 4)}}
    one_sided = method.weighted_matrix("m", weight, stats, Config())
    with kfac_variant(two_sided_allocation=True):
        two_sided = method.weighted_matrix("m", weight, stats, Config())
        expected = kronecker.kronecker_weighted_matrix(
            weight, stats["gradient_second_moment"]["m"], stats["output_gradient_second_moment"]["m"]
        )
        assert torch.equal(two_sided, expected)
    assert not torch.allclose(one_sided, two_sided)
    assert "weighted_matrix" not in vars(type(method))
    assert torch.equal(method.weighted_matrix("m", weight, stats, Config()), one_sided)


def test_global_allocation_reads_the_method_spectrum():
    """`budget_ranks` scores the method's `weighted_matrix`: with the two-sided spectrum, a module whose output
    gradients live in one direction gets fewer directions than one with isotropic output gradients; with the library's
    one-sided spectrum the two identical modules get the same rank."""
    weight = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(12)))[0]
    stats = Statistics(
        {
            "row_fisher": {"a": torch.ones(16), "b": torch.ones(16)},
            "gradient_second_moment": {"a": torch.eye(16), "b": torch.eye(16)},
            "output_gradient_second_moment": {"a": torch.diag(torch.tensor([1.0] + [1e-4] * 15)), "b": torch.eye(16)},
        }
    )
    shapes = {"a": (16, 16), "b": (16, 16)}
    config = FWSVDConfig(method="kfac_whiten", param_budget=0.5, allocation_power=1.0)
    weights = [("a", weight), ("b", weight)]
    one_sided, dense = budget_ranks(weights, shapes, config, stats)
    with kfac_variant(two_sided_allocation=True):
        two_sided, _ = budget_ranks(weights, shapes, config, stats)
    assert one_sided["a"] == one_sided["b"] and dense == []
    assert two_sided["a"] < two_sided["b"]


def test_bad_damping_is_refused():
    with pytest.raises(ValueError, match="`output_damping` must be positive, got 0"):
        with kfac_variant(output_damping=0):
            pass


def test_rows_name_the_variant_after_their_setting(monkeypatch):
    import benchmarks.causal_lm as causal_lm
    import benchmarks.kfac_screen as screen

    assert screen.variant_note() == ""
    assert screen.variant_note(output_damping=0.01) == "damping 1e-2"
    assert screen.variant_note(output_damping=0.015) == "damping 1.5e-2"  # not rounded onto 0.01's or 0.02's name
    assert screen.variant_note(0.01, two_sided_allocation=True) == "two-sided allocation, damping 1e-2"
    seen = {}
    monkeypatch.setattr(causal_lm, "main", lambda argv, note="": seen.update(argv=argv, note=note))
    screen.main(["--two-sided-allocation", "--", "--runs", "kfac_whiten+alloc1+mix@0.8"])
    assert seen == {"argv": ["--runs", "kfac_whiten+alloc1+mix@0.8"], "note": "two-sided allocation"}
