"""The kfac screen's variants change exactly the damping of G or the allocation's spectrum, and are undone on exit."""

from __future__ import annotations

import pytest
import torch

import hf_fwsvd.kronecker as kronecker
from benchmarks.kfac_screen import kfac_variant
from hf_fwsvd.factorize import factorize
from hf_fwsvd.methods import get_method


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


def test_one_sided_allocation_scores_w_m_only():
    method = get_method("kfac_whiten")
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    stats = {"gradient_second_moment": {"m": moment(4, 3)}, "output_gradient_second_moment": {"m": moment(6, 4)}}
    two_sided = method.weighted_matrix("m", weight, stats, Config())
    with kfac_variant(one_sided_allocation=True):
        one_sided = method.weighted_matrix("m", weight, stats, Config())
        assert torch.equal(one_sided, get_method("fisher_whiten").weighted_matrix("m", weight, stats, Config()))
    assert not torch.allclose(one_sided, two_sided)
    assert torch.equal(method.weighted_matrix("m", weight, stats, Config()), two_sided)


def test_bad_damping_is_refused():
    with pytest.raises(ValueError, match="`output_damping` must be positive, got 0"):
        with kfac_variant(output_damping=0):
            pass
