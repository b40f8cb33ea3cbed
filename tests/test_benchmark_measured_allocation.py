"""The measured-sensitivity allocation: cached block inputs reproduce full forwards, the curve becomes convex
non-increasing direction scores, and the allocation is patched in and out of `compress` exactly."""

from __future__ import annotations

import pytest
import torch

import hf_fwsvd.pipeline as pipeline
from benchmarks.measured_allocation import (
    BlockInputs,
    break_even_rank,
    curve_scores,
    curve_values,
    lower_convex_hull,
    measure_module,
    measured_allocation,
    predicted_increase,
    rank_for_fraction,
    threshold_allocation,
)
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.allocation import allocate_ranks
from hf_fwsvd.targets import find_target_modules
from tests.conftest import tiny_llama


def _model_and_ids():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    return model, torch.randint(0, model.config.vocab_size, (2, 12))


def _full_loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_cached_block_inputs_give_the_dense_loss_from_every_block():
    model, ids = _model_and_ids()
    cache = BlockInputs(model, ids)
    assert cache.dense_loss == pytest.approx(_full_loss(model, ids), abs=0)
    for block in range(2):
        assert cache.loss_from(block) == pytest.approx(cache.dense_loss, rel=1e-6)
    assert len(model.model.layers) == 2  # restored


def test_measured_points_match_full_forwards_of_the_truncated_model_and_the_weight_is_restored():
    model, ids = _model_and_ids()
    cache = BlockInputs(model, ids)
    name = "model.layers.1.mlp.up_proj"
    module = model.get_submodule(name)
    original = module.weight.detach().clone()

    def truncate(weight, rank):
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]

    points = measure_module(cache, module, name, truncate, fractions=(0.0, 0.5))
    assert [rank for rank, _ in points] == [0, rank_for_fraction((32, 16), 0.5)] == [0, 5]
    assert torch.equal(module.weight, original)
    for rank, delta in points:
        expected_weight = torch.zeros_like(original) if rank == 0 else truncate(original, rank)
        with torch.no_grad():
            module.weight.copy_(expected_weight)
        assert delta == pytest.approx(_full_loss(model, ids) - cache.dense_loss, rel=1e-5, abs=1e-6)
        with torch.no_grad():
            module.weight.copy_(original)


def test_lower_convex_hull_drops_points_above_the_chords():
    points = [(0, 10.0), (1, 4.0), (2, 5.0), (3, 1.0), (4, 0.0)]
    assert lower_convex_hull(points) == [(0, 10.0), (1, 4.0), (3, 1.0), (4, 0.0)]


def test_curve_scores_are_the_drops_of_the_convex_hull_down_to_the_break_even_rank():
    shape = (12, 6)  # break-even rank 4
    assert break_even_rank(shape) == 4
    scores = curve_scores(shape, [(0, 8.0), (1, 2.0), (2, 3.0), (3, -0.5)])
    # hull: (0, 8) (1, 2) (3, 0) (4, 0) once (2, 3) is dropped and -0.5 clipped: drops 6, 1, 1, 0, then 0 past 4
    assert scores.tolist() == [6.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert scores.dtype == torch.float64


def test_curve_scores_extrapolate_the_first_segment_below_the_smallest_measured_rank():
    scores = curve_scores((12, 6), [(2, 2.0)])  # chord (2, 2) -> (4, 0): slope -1, extended to rank 0
    assert scores.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_curve_scores_refuse_empty_and_out_of_range_points():
    with pytest.raises(ValueError, match="No measured points: cannot score the directions."):
        curve_scores((12, 6), [])
    with pytest.raises(ValueError, match=r"Measured rank 4 is outside \[0, 4.0\) \(the break-even rank\)."):
        curve_scores((12, 6), [(4, 1.0)])


@pytest.mark.parametrize("rule", ["greedy", "threshold"])
def test_measured_allocation_drives_compress_and_is_restored(rule):
    model, ids = _model_and_ids()
    targets = find_target_modules(model, FWSVDConfig(method="svd", rank=1))
    shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
    # the up projections are made the most sensitive: they should keep the most rank
    curves = {
        name: [(0, 5.0 if "up_proj" in name else 0.5), (1, 1.0 if "up_proj" in name else 0.01)] for name in shapes
    }
    if rule == "greedy":
        allocation = allocate_ranks(shapes, {n: curve_scores(s, curves[n]) for n, s in shapes.items()}, 0.7)
        expected_ranks, expected_dense = allocation.ranks, allocation.dense
    else:
        expected_ranks, expected_dense = threshold_allocation(shapes, curves, 0.7)
    assert {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"} <= set(expected_dense)
    data = [{"input_ids": row} for row in ids.tolist()]
    config = FWSVDConfig(method="svd", param_budget=0.7, allocation_power=1.0, calibration_dataset=data)
    with measured_allocation(curves, rule):
        compress(model, config, show_progress=False)
    assert model.config.quantization_config.ranks == expected_ranks
    assert sorted(model.fwsvd_report.dense_modules) == expected_dense
    assert pipeline.budget_ranks.__module__ == "hf_fwsvd.pipeline"


def test_measured_allocation_names_a_module_without_a_curve():
    model, ids = _model_and_ids()
    data = [{"input_ids": row} for row in ids.tolist()]
    config = FWSVDConfig(method="svd", param_budget=0.7, calibration_dataset=data)
    expected = r"No measured sensitivity for 14 module\(s\), e.g. `model.layers.0.mlp.down_proj`; measure them first."
    with pytest.raises(ValueError, match=expected):
        with measured_allocation({}):
            compress(model, config, show_progress=False)
    assert pipeline.budget_ranks.__module__ == "hf_fwsvd.pipeline"


def test_threshold_allocation_takes_the_smallest_threshold_that_fits_like_asvd():
    shapes = {"a": (12, 6), "b": (12, 6)}  # 72 weights each, a rank costs 18
    curves = {"a": [(0, 9.0), (1, 0.5), (2, 0.2), (3, 0.05)], "b": [(1, 0.4), (2, 0.1), (3, 0.01)]}
    # sorted: b3 0.01, a3 0.05, b2 0.1, a2 0.2, b1 0.4, a1 0.5 (rank 0 is never a choice)
    assert threshold_allocation(shapes, curves, 0.99) == ({"b": 3}, ["a"])  # 54 + 72 = 126 <= 142
    assert threshold_allocation(shapes, curves, 0.6) == ({"a": 2, "b": 2}, [])  # a3 b2 keep 54 + 36 = 90 > 86
    assert threshold_allocation(shapes, curves, 0.3) == ({"a": 1, "b": 1}, [])
    with pytest.raises(ValueError, match=r"`param_budget=0.2` is below what the smallest measured ranks keep."):
        threshold_allocation(shapes, curves, 0.2)


def test_threshold_allocation_matches_a_brute_force_scan_of_every_threshold():
    generator = torch.Generator().manual_seed(3)
    shapes = {f"m{i}": (int(8 + 4 * i), 8) for i in range(5)}
    curves = {
        name: [(rank, float(torch.rand((), generator=generator))) for rank in range(1, int(8 * s[0] / (s[0] + 8)))]
        for name, s in shapes.items()
    }
    for budget in (0.3, 0.5, 0.7, 0.9):
        limit = int(budget * sum(a * b for a, b in shapes.values()))
        for threshold in sorted(d for points in curves.values() for _, d in points) + [float("inf")]:
            ranks = {n: min((r for r, d in curves[n] if d < threshold), default=None) for n in shapes}
            kept = sum(r * sum(shapes[n]) if r else shapes[n][0] * shapes[n][1] for n, r in ranks.items())
            if kept <= limit:  # the first threshold that fits, with the points strictly below it taken
                break
        expected = {n: r for n, r in ranks.items() if r}
        assert threshold_allocation(shapes, curves, budget) == (expected, sorted(set(shapes) - set(expected)))


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match=r"`rule` must be one of \('greedy', 'threshold'\), got 'median'."):
        with measured_allocation({}, "median"):
            pass


def test_predicted_increase_sums_the_hull_at_each_rank_and_zero_for_dense_modules():
    shapes = {"a": (12, 6), "b": (12, 6), "c": (12, 6)}
    curves = {"a": [(0, 8.0), (1, 2.0), (3, 0.0)], "b": [(2, 2.0)], "c": [(1, 5.0)]}
    assert curve_values(shapes["a"], curves["a"]).tolist() == [8.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # a at rank 2 -> 1.0 (on the chord (1, 2) - (3, 0)); b at rank 1 -> 3.0 (chord (2, 2) - (4, 0) extended); c dense
    assert predicted_increase(shapes, curves, {"a": 2, "b": 1}) == pytest.approx(4.0)
