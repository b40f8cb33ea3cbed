"""The compact-model sweep: slicing one nested factorisation equals compressing at each fraction directly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_data, tiny_bert

from benchmarks import compact_sweep
from benchmarks.compact_sweep import block_kept, report, sweep_points, uniform_ranks
from benchmarks.compare_methods import append_row
from hf_fwsvd import FWSVDConfig, LowRankLinear
from hf_fwsvd.methods import collect_statistics
from hf_fwsvd.pipeline import compress_model
from hf_fwsvd.targets import find_target_modules


@pytest.fixture(scope="module")
def dense_and_stats():
    torch.manual_seed(0)
    dense = tiny_bert().eval()
    config = FWSVDConfig(
        method="whiten", param_budget=0.5, allocation="fisher", calibration_dataset=calibration_data("bert", 16)
    )
    return dense, collect_statistics(dense, config, find_target_modules(dense, config), None, False), config


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


@pytest.mark.parametrize("method", ["whiten", "fwsvd"], ids=["whiten", "fwsvd"])
def test_uniform_points_equal_direct_param_ratio_compression(dense_and_stats, method):
    dense, stats, config = dense_and_stats
    points = list(sweep_points(dense, stats, method, [0.5, 0.9, 0.7], None, config))
    assert [point.fraction for point, _ in points] == [0.9, 0.7, 0.5]
    for point, model in points:
        direct = copy.deepcopy(dense)
        run_config, _ = compress_model(
            direct, FWSVDConfig(method=method, param_ratio=point.fraction, svd_solver="full"), None, False, stats
        )
        assert point.ranks == run_config.ranks
        found, expected = _weights(model), _weights(direct)
        assert found.keys() == expected.keys() and len(found) == 12
        for name in expected:
            assert torch.allclose(found[name], expected[name], atol=1e-6, rtol=0), name
    # the dense model is untouched
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())


def test_allocated_points_equal_direct_param_budget_compression(dense_and_stats):
    dense, stats, config = dense_and_stats
    for point, model in sweep_points(dense, stats, "whiten", [0.8, 0.5], 0.5, config):
        direct = copy.deepcopy(dense)
        budget = FWSVDConfig(
            method="whiten", param_budget=point.fraction, allocation="fisher", allocation_power=0.5, svd_solver="full"
        )
        run_config, _ = compress_model(direct, budget, None, False, stats)
        assert point.ranks == run_config.ranks
        assert sorted(point.ranks) == sorted(_weights(model))  # modules the allocation leaves dense stay dense
        for name, weight in _weights(direct).items():
            assert torch.allclose(_weights(model)[name], weight, atol=1e-6, rtol=0), name
        assert point.block_kept <= point.fraction


def test_block_kept_counts_factors_and_dense_modules():
    shapes = {"a": (8, 4), "b": (6, 6)}  # 32 + 36 = 68 weights
    assert block_kept(shapes, {"a": 1, "b": 2}) == (12 + 24) / 68
    assert block_kept(shapes, {"a": 2}) == (24 + 36) / 68  # b left dense
    assert uniform_ranks(shapes, 0.5) == {"a": 1, "b": 1}  # floor(16 / 12), floor(18 / 12)
    assert uniform_ranks(shapes, 0.9) == {"a": 2, "b": 2}  # floor(28.8 / 12), floor(32.4 / 12)


def test_report_finds_the_last_fraction_within_one_point(tmp_path, monkeypatch):
    path = tmp_path / "compact.csv"
    monkeypatch.setattr(compact_sweep, "RESULTS", path)
    base = {"model": "mpnet", "task": "trec", "variant": "whiten", "allocation_power": "", "num_samples": 128}
    base |= {"seed": 0, "metric": "accuracy", "dense_score": 0.834, "compressed_modules": 72}
    for fraction, value, within, block, params in [
        (0.9, 0.830, 1, 0.9, 0.92),
        (0.8, 0.826, 1, 0.8, 0.85),
        (0.7, 0.810, 0, 0.7, 0.78),
    ]:
        row = base | {"fraction": fraction, "score": value, "within_1pt": within, "block_kept": block}
        append_row(
            path, row | {"params_kept": params, "drop_points": round((0.834 - value) * 100, 2)}, compact_sweep.FIELDS
        )
    assert report(path) == [
        "mpnet trec (dense 83.4) whiten: 20% of block weights / 15.0% of all parameters removable; "
        "0.90: 83.0, 0.80: 82.6, 0.70: 81.0"
    ]


def test_fractions_clamped_to_the_same_ranks_give_one_point(dense_and_stats):
    dense, stats, config = dense_and_stats
    # tiny BERT's 16x16 / 16x32 / 32x16 modules pay off up to 75% of their weights: 0.9 and 0.8 both clamp there
    points = [point for point, _ in sweep_points(dense, stats, "whiten", [0.8, 0.9, 0.5], None, config)]
    assert [point.fraction for point in points] == [0.9, 0.5]
    assert points[0].block_kept == 0.75
