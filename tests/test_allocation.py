"""Global rank allocation: the budget is met, the greedy is optimal where it should be, dense layers are omitted."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import calibration_data, tiny_bert, tiny_llama

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.allocation import allocate_ranks, direction_scores
from hf_fwsvd.factorize import full_rank


def random_problem(seed, count=6):
    generator = torch.Generator().manual_seed(seed)
    shapes, scores = {}, {}
    for index in range(count):
        out_features, in_features = (int(v) for v in torch.randint(10, 60, (2,), generator=generator))
        values = torch.rand(full_rank((out_features, in_features)), generator=generator, dtype=torch.float64)
        scale = float(torch.rand(1, generator=generator)) * 10**index
        shapes[f"m{index}"] = (out_features, in_features)
        scores[f"m{index}"] = values.sort(descending=True).values * scale
    return shapes, scores


def held(shapes, allocation, name):
    out_features, in_features = shapes[name]
    if name in allocation.dense:
        return out_features * in_features
    return allocation.ranks[name] * (out_features + in_features)


def next_step(shapes, allocation, name):
    out_features, in_features = shapes[name]
    rank = allocation.ranks[name]
    if (rank + 1) * (out_features + in_features) >= out_features * in_features:
        return out_features * in_features - rank * (out_features + in_features)
    return out_features + in_features


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(5))
def test_budget_met_and_no_further_step_fits(seed, budget):
    shapes, scores = random_problem(seed)
    allocation = allocate_ranks(shapes, scores, budget)
    total = sum(out * inp for out, inp in shapes.values())
    assert allocation.budget_params == int(budget * total)
    kept = sum(held(shapes, allocation, name) for name in shapes)
    assert kept == allocation.kept_params <= allocation.budget_params
    assert set(allocation.ranks) | set(allocation.dense) == set(shapes)
    for name, rank in allocation.ranks.items():
        out_features, in_features = shapes[name]
        assert 1 <= rank and rank * (out_features + in_features) < out_features * in_features
        assert next_step(shapes, allocation, name) > allocation.budget_params - kept


def test_greedy_is_optimal_for_equal_costs_against_brute_force():
    generator = torch.Generator().manual_seed(7)
    shapes = {"a": (12, 12), "b": (12, 12), "c": (12, 12)}  # break-even rank 6
    scores = {
        name: torch.rand(12, generator=generator, dtype=torch.float64).sort(descending=True).values * (10**i)
        for i, name in enumerate(shapes)
    }
    budget = 0.4  # 172 of 432 weights: 7 directions of 24
    allocation = allocate_ranks(shapes, scores, budget)
    best = None
    for ranks in itertools.product(range(1, 6), repeat=3):
        if sum(ranks) * 24 > allocation.budget_params:
            continue
        lost = sum(float(scores[name][rank:].sum()) for name, rank in zip(shapes, ranks, strict=True))
        best = lost if best is None else min(best, lost)
    chosen = sum(float(scores[name][allocation.ranks[name] :].sum()) for name in shapes)
    assert chosen == pytest.approx(best)
    assert sum(allocation.ranks.values()) == 7


def test_module_that_would_not_pay_off_is_left_dense():
    shapes = {"big": (8, 8), "small": (8, 8), "other": (40, 40)}
    scores = {
        "big": torch.full((8,), 1e6, dtype=torch.float64),
        "small": torch.linspace(1, 0, 8, dtype=torch.float64) * 1e-6,
        "other": torch.linspace(1, 0, 40, dtype=torch.float64) * 1e-3,
    }
    allocation = allocate_ranks(shapes, scores, 0.5)
    assert "big" in allocation.dense  # its rank reached break-even: dense is cheaper and exact
    assert "big" not in allocation.ranks
    assert allocation.kept_params <= allocation.budget_params


def test_budget_too_small_for_rank_one_raises():
    with pytest.raises(ValueError, match=r"rank 1 in every one of the 2 targeted modules already needs 128"):
        allocate_ranks({"a": (32, 32), "b": (32, 32)}, {n: torch.ones(32) for n in "ab"}, 0.05)


def test_direction_scores_sum_to_mass():
    scores = direction_scores(torch.randn(6, 9), mass=5.0)
    assert scores.shape == (6,) and float(scores.sum()) == pytest.approx(5.0)
    assert bool((scores[:-1] >= scores[1:]).all())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(param_budget=0.5, rank=4), "Give only one of"),
        (dict(param_budget=1.0), r"`param_budget` must be in \(0, 1\)"),
        (dict(allocation="fisher"), "needs `param_budget=`"),
        (dict(param_budget=0.5, allocation="greedy"), "Unknown allocation 'greedy'"),
        (dict(param_budget=0.5, rank_pattern={"query": 2}), "`rank_pattern` cannot be combined"),
        (dict(method="whitening"), "Unknown method 'whitening'"),
        (dict(param_budget=0.5, allocation_power=2.0), r"`allocation_power` must be in \[0, 1\]"),
    ],
    ids=["exclusive", "range", "allocation-alone", "unknown-allocation", "pattern", "unknown-method", "power"],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FWSVDConfig(**kwargs)


def targeted_params(model):
    report = model.fwsvd_report
    low_rank = sum(row.params_after for row in report.modules)
    dense = 0
    for name in report.dense_modules:
        dense += model.get_submodule(name).weight.numel()
    return low_rank, dense


@pytest.mark.parametrize("arch, make", [("bert", tiny_bert), ("llama", tiny_llama)], ids=["bert", "llama"])
def test_compress_meets_budget_and_reloads(arch, make, tmp_path, sample_input):
    torch.manual_seed(0)
    model = make()
    dense_total = sum(
        m.weight.numel() for n, m in model.named_modules() if n.count(".") >= 3 and isinstance(m, torch.nn.Linear)
    )
    config = FWSVDConfig(param_budget=0.5, calibration_dataset=calibration_data(arch, 16))
    assert config.allocation == "fisher"
    compress(model, config, show_progress=False)
    low_rank, dense = targeted_params(model)
    assert low_rank + dense <= int(0.5 * dense_total)
    saved = model.config.quantization_config
    assert set(saved.ranks) | set(model.fwsvd_report.dense_modules) == {
        row.name for row in model.fwsvd_report.modules
    } | set(model.fwsvd_report.dense_modules)
    assert not set(saved.ranks) & set(model.fwsvd_report.dense_modules)
    model.save_pretrained(tmp_path / "c")
    reloaded = type(model).from_pretrained(tmp_path / "c")
    model.eval()
    with torch.no_grad():
        expected, actual = model(**sample_input).logits, reloaded(**sample_input).logits
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert state.keys() == reloaded_state.keys()
    assert all(torch.equal(state[key], reloaded_state[key]) for key in state)
    # same weights; BLAS may pick another kernel for the rank-1 factors, so allow last-bit differences
    assert torch.allclose(expected, actual, rtol=0, atol=1e-6)


def test_fisher_allocation_beats_uniform_on_fisher_weighted_error():
    torch.manual_seed(0)
    data = calibration_data("bert", 16)
    errors = {}
    for allocation in ("uniform", "fisher"):
        torch.manual_seed(0)
        model = tiny_bert()
        compress(
            model,
            FWSVDConfig(param_budget=0.4, allocation=allocation, allocation_power=1.0, calibration_dataset=data),
            show_progress=False,
        )
        errors[allocation] = model
    # same budget, and the summed Fisher-weighted error (the allocation's objective) is lower
    from hf_fwsvd.calibration import build_calibration_loader
    from hf_fwsvd.fisher import estimate_fisher

    torch.manual_seed(0)
    dense = tiny_bert()
    names = [row.name for row in errors["uniform"].fwsvd_report.modules]
    fisher = estimate_fisher(dense, build_calibration_loader(data, model=dense), names, show_progress=False)

    def weighted_error(model):
        total = 0.0
        for name in names:
            original = dense.get_submodule(name).weight
            approx = model.get_submodule(name).weight
            total += float(((original - approx).square().sum(0) * fisher[name]).sum())
        return total

    uniform_kept = sum(targeted_params(errors["uniform"]))
    fisher_kept = sum(targeted_params(errors["fisher"]))
    assert fisher_kept <= int(0.4 * sum(dense.get_submodule(n).weight.numel() for n in names))
    assert uniform_kept <= int(0.4 * sum(dense.get_submodule(n).weight.numel() for n in names))
    assert weighted_error(errors["fisher"]) < weighted_error(errors["uniform"])
