"""tfwsvd: the element-wise objective never rises, beats row-wise FWSVD on it, and plugs into compress."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_bert

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.factorize import LowRankFactors, factorize
from hf_fwsvd.refine import refine_elementwise, weighted_objective


def problem(seed, out_features=14, in_features=10):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    # heavy-tailed, non-separable element weights: row-wise FWSVD cannot express them
    importance = torch.rand(out_features, in_features, generator=generator).pow(4) * 10
    return weight, importance


@pytest.mark.parametrize("seed", range(4))
def test_objective_never_rises_and_improves_on_fwsvd(seed):
    weight, importance = problem(seed)
    start = factorize(weight, 3, importance.sum(0))
    result = refine_elementwise(weight, importance, start, iterations=15, floor=0.0, tolerance=0.0)
    history = result.history
    assert all(later <= earlier for earlier, later in zip(history, history[1:], strict=False))
    normalised = importance / importance.max()
    assert history[0] == pytest.approx(weighted_objective(weight, normalised, start))
    assert history[-1] == pytest.approx(weighted_objective(weight, normalised, result.factors))
    assert history[-1] < 0.95 * history[0]
    assert result.improvement > 0.05


def test_rejected_step_keeps_the_best_factors():
    weight, importance = problem(0)
    start = factorize(weight, 2, importance.sum(0))
    # a huge ridge makes the solves shrink the factors towards zero: every step is worse and must be rejected
    result = refine_elementwise(weight, importance, start, iterations=5, floor=0.0, ridge=1e6)
    assert result.history == [result.history[0]]
    assert torch.equal(result.factors.up, start.up) and torch.equal(result.factors.down, start.down)


def test_stopping_rule_ends_early_at_a_fixed_point():
    weight, _ = problem(1)
    uniform = torch.ones_like(weight)
    start = factorize(weight, 4)  # plain SVD is already optimal for uniform weights
    result = refine_elementwise(weight, uniform, start, iterations=50, floor=0.0)
    assert len(result.history) <= 3
    assert result.history[-1] == pytest.approx(result.history[0], rel=1e-6)


def test_refine_rejects_bad_importance():
    weight = torch.randn(5, 4)
    start = LowRankFactors(down=torch.randn(2, 4), up=torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"`blk.fc`.*shape \(4, 5\), expected \(5, 4\)"):
        refine_elementwise(weight, torch.ones(4, 5), start, name="blk.fc")
    with pytest.raises(ValueError, match="`blk.fc` is all zeros"):
        refine_elementwise(weight, torch.zeros(5, 4), start, name="blk.fc")


def test_tfwsvd_compress_lowers_elementwise_error_against_fwsvd(sample_input, tmp_path):
    data = calibration_data("bert", 16)
    models = {}
    for method in ("fwsvd", "tfwsvd"):
        torch.manual_seed(0)
        models[method] = compress(
            tiny_bert().eval(), FWSVDConfig(method=method, rank=3, calibration_dataset=data), show_progress=False
        )
    torch.manual_seed(0)
    dense = tiny_bert().eval()
    from hf_fwsvd.calibration import build_calibration_loader
    from hf_fwsvd.fisher import estimate_fisher_statistics

    names = list(models["fwsvd"].config.quantization_config.ranks)
    stats = estimate_fisher_statistics(
        dense, build_calibration_loader(data, model=dense), names, show_progress=False, elementwise=True
    )
    for name in names:
        weight = dense.get_submodule(name).weight
        weights = stats.elementwise[name]

        def error(model, name=name, weight=weight, weights=weights):
            low_rank = model.get_submodule(name)
            return weighted_objective(weight, weights, LowRankFactors(low_rank.down.weight, low_rank.up.weight))

        assert error(models["tfwsvd"]) <= error(models["fwsvd"]) * (1 + 1e-5), name
    model = models["tfwsvd"]
    model.save_pretrained(tmp_path / "t")
    reloaded = type(model).from_pretrained(tmp_path / "t")
    with torch.no_grad():
        assert torch.allclose(model(**sample_input).logits, reloaded(**sample_input).logits, rtol=0, atol=1e-6)


def brute_force_rows(target, weights, right):
    """Each row's weighted least squares, by scaling its equations with sqrt(weight) and calling lstsq."""
    rows = []
    for o in range(target.shape[0]):
        root = weights[o].sqrt()
        rows.append(torch.linalg.lstsq((right * root).T, target[o] * root).solution)
    return torch.stack(rows)


def test_row_solve_matches_each_rows_weighted_least_squares():
    from hf_fwsvd.refine import _solve_rows

    generator = torch.Generator().manual_seed(3)
    target = torch.randn(9, 12, generator=generator, dtype=torch.float64)
    weights = torch.rand(9, 12, generator=generator, dtype=torch.float64)
    right = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    solved = _solve_rows(target, weights, right, ridge=0.0)
    assert torch.allclose(solved, brute_force_rows(target, weights, right), atol=1e-10)


def test_row_solve_in_chunks_matches_brute_force(monkeypatch):
    import hf_fwsvd.refine as refine

    generator = torch.Generator().manual_seed(4)
    target = torch.randn(23, 17, generator=generator, dtype=torch.float64)
    weights = torch.rand(23, 17, generator=generator, dtype=torch.float64)
    right = torch.randn(5, 17, generator=generator, dtype=torch.float64)
    monkeypatch.setattr(refine, "_CHUNK_ELEMENTS", 2 * 5 * 5)  # two rows per chunk, twelve chunks
    solved = refine._solve_rows(target, weights, right, ridge=0.0)
    assert torch.allclose(solved, brute_force_rows(target, weights, right), atol=1e-10)


def test_rows_whose_cholesky_fails_fall_back_to_lu(monkeypatch):
    import hf_fwsvd.refine as refine

    generator = torch.Generator().manual_seed(5)
    target = torch.randn(6, 11, generator=generator, dtype=torch.float64)
    weights = torch.rand(6, 11, generator=generator, dtype=torch.float64)
    right = torch.randn(3, 11, generator=generator, dtype=torch.float64)
    cholesky_ex = torch.linalg.cholesky_ex

    def failing_rows_1_and_4(system, upper=False):
        factor, info = cholesky_ex(system, upper=upper)
        factor = factor.clone()
        factor[[1, 4]] = float("nan")  # a failed factorisation leaves nothing usable
        info = info.clone()
        info[[1, 4]] = 2
        return factor, info

    monkeypatch.setattr(refine.torch.linalg, "cholesky_ex", failing_rows_1_and_4)
    solved = refine._solve_rows(target, weights, right, ridge=0.0)
    assert torch.allclose(solved, brute_force_rows(target, weights, right), atol=1e-10)
