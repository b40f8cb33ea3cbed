"""Attention-sink modules kept dense under the global allocation (`hf_fwsvd.sinks`, `sink_threshold`)."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_llama

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.allocation import allocate_ranks
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.methods import required_statistics
from hf_fwsvd.sinks import first_token_energy_ratios, sink_modules
from hf_fwsvd.statistics import Statistics, collect
from hf_fwsvd.targets import find_target_modules


def _brute_force_energies(model, targets, batches) -> dict[str, tuple[float, float, int, int]]:
    """Per module: the summed |y|^2 of each row's first real token and of its other real tokens, and their counts."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: outputs[name].append(o.detach()))
        for name in targets
    ]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    energies = {}
    for name, per_batch in outputs.items():
        first = other = 0.0
        sequences = others = 0
        for output, batch in zip(per_batch, batches, strict=True):
            for row, mask in zip(output.double(), batch["attention_mask"], strict=True):
                real = row[mask.bool()].square().sum(-1)
                first += float(real[0])
                other += float(real[1:].sum())
                sequences += 1
                others += len(real) - 1
        energies[name] = (first, other, sequences, others)
    return energies


@pytest.mark.parametrize("side", ["right", "left"])
def test_first_token_output_energy_matches_brute_force_with_padding(side):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = FWSVDConfig(rank=2)
    targets = find_target_modules(model, config)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ([5, 9, 7], [9, 3, 8]):
        ids = torch.randint(3, 64, (3, 9), generator=generator)
        mask = torch.zeros(3, 9, dtype=torch.long)
        for row, length in enumerate(lengths):
            if side == "right":
                mask[row, :length] = 1
            else:
                mask[row, 9 - length :] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    stats = collect(model, batches, targets, ["first_token_output_energy"])
    expected = _brute_force_energies(model, targets, batches)
    ratios = first_token_energy_ratios(stats)
    for name, (first, other, sequences, others) in expected.items():
        collected = stats["first_token_output_energy"][name].double()
        tokens = sequences + others
        reference = torch.tensor([first, other, sequences, others], dtype=torch.float64) / tokens
        torch.testing.assert_close(collected, reference, rtol=1e-5, atol=0)
        assert ratios[name] == pytest.approx((first / sequences) / (other / others), rel=1e-5)
    assert len({round(ratio, 4) for ratio in ratios.values()}) > 1  # the ratios really differ between modules


def test_sink_modules_are_those_above_the_threshold_in_model_order():
    energies = {
        "a": torch.tensor([8.0, 2.0, 1.0, 10.0]),
        "b": torch.tensor([1.0, 10.0, 1.0, 10.0]),
        "c": torch.tensor([2.0, 0.0, 1.0, 10.0]),
        "d": torch.tensor([0.0, 0.0, 1.0, 0.0]),
    }
    stats = Statistics({"first_token_output_energy": energies})
    assert first_token_energy_ratios(stats) == {"a": 40.0, "b": 1.0, "c": float("inf"), "d": 0.0}
    assert sink_modules(stats, 30) == ["a", "c"]
    assert sink_modules(stats, 50) == ["c"]


def test_the_ratio_does_not_depend_on_the_sequence_length():
    """A sink token of energy 100 among later tokens of energy 1: ratio 100 in sequences of 4 and of 16 tokens."""
    from hf_fwsvd.statistics import Observation
    from hf_fwsvd.statistics.builtin import FirstTokenOutputEnergy

    ratios = []
    for length in (4, 16):
        outputs = torch.ones(3, length, 1)
        outputs[:, 0] = 10.0
        values = FirstTokenOutputEnergy().accumulate(Observation(torch.zeros(3, length, 2), outputs=outputs))
        ratios.append(first_token_energy_ratios(Statistics({"first_token_output_energy": {"m": values}}))["m"])
    assert ratios == [100.0, 100.0]


def test_allocation_keeps_the_named_modules_dense_within_the_budget():
    shapes = {"small": (20, 30), "big": (40, 50), "other": (30, 30)}
    scores = {name: torch.linspace(1, 0.01, min(shape), dtype=torch.float64) for name, shape in shapes.items()}
    scores["big"] = scores["big"] * 1e-6  # the allocation alone would give it the lowest rank
    free = allocate_ranks(shapes, scores, 0.6)
    assert "big" not in free.dense and free.ranks["big"] < min(shapes["big"])
    kept = allocate_ranks(shapes, scores, 0.7, keep_dense=["big"])
    assert "big" in kept.dense and "big" not in kept.ranks
    assert kept.kept_params <= kept.budget_params == int(0.7 * (600 + 2000 + 900))
    assert 2000 + sum(kept.ranks[n] * sum(shapes[n]) for n in kept.ranks) == kept.kept_params
    with pytest.raises(ValueError) as error:
        allocate_ranks(shapes, scores, 0.6, keep_dense=["missing"])
    assert str(error.value) == "`keep_dense` names module(s) the allocation does not target: missing."
    with pytest.raises(ValueError, match=r"rank 1 in every one of the 3 targeted modules \(with 1 kept dense\)"):
        allocate_ranks(shapes, scores, 0.6, keep_dense=["big"])


def test_compress_keeps_the_sink_modules_dense_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    data = calibration_data("llama", 16)
    probe = FWSVDConfig(method="kfac_whiten", param_budget=0.7)
    targets = find_target_modules(model, probe)
    loader = build_calibration_loader(data, None, model, batch_size=8, max_length=128, num_samples=None)
    ratios = first_token_energy_ratios(collect(model, loader, targets, ["first_token_output_energy"]))
    ordered = sorted(ratios.values(), reverse=True)
    threshold = (ordered[1] + ordered[2]) / 2  # exactly two modules above it
    assert threshold > 1
    expected = [name for name, ratio in ratios.items() if ratio > threshold]
    config = FWSVDConfig(method="kfac_whiten", param_budget=0.7, sink_threshold=threshold, calibration_dataset=data)
    assert "first_token_output_energy" in required_statistics(config)
    compress(model, config, show_progress=False)
    report = model.fwsvd_report
    assert len(expected) == 2 and set(expected) <= set(report.dense_modules)
    assert report.sink_modules == expected
    table = report.format_table()
    for name in report.dense_modules:
        reason = "attention sink" if name in expected else "low rank would not pay off"
        assert f"{name:<48} {f'(left dense: {reason})':>42}" in table.splitlines()
    assert not set(expected) & {row.name for row in report.modules}
    low_rank = sum(row.params_after for row in report.modules)
    dense = sum(targets[name].weight.numel() for name in report.dense_modules)
    assert low_rank + dense <= int(0.7 * sum(module.weight.numel() for module in targets.values()))
    model.save_pretrained(tmp_path / "saved")
    reloaded = type(model).from_pretrained(tmp_path / "saved").eval()
    assert reloaded.fwsvd_report.sink_modules == expected
    card = (tmp_path / "saved" / "README.md").read_text()
    rank_setting = (
        "| Rank setting | `param_budget=0.7` (70% of the targeted modules' weights kept in total, allocation "
        f"`fisher` with `allocation_power=0.5`); `sink_threshold={threshold:g}`: 2 attention-sink modules kept dense |"
    )
    assert rank_setting in card
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(param_budget=0.5, sink_threshold=1.0),
            "`sink_threshold` must be above 1 (a ratio of mean token energies), got 1.0.",
        ),
        (dict(param_budget=0.5, sink_threshold=True), "`sink_threshold` must be a number above 1, got True."),
        (
            dict(rank_ratio=0.5, sink_threshold=50.0),
            "`sink_threshold` keeps modules dense inside the global allocation; pass `param_budget=` with "
            'allocation="fisher" (the default there).',
        ),
        (
            dict(param_budget=0.5, allocation="uniform", sink_threshold=50.0),
            "`sink_threshold` keeps modules dense inside the global allocation; pass `param_budget=` with "
            'allocation="fisher" (the default there).',
        ),
    ],
    ids=["range", "bool", "no-budget", "uniform"],
)
def test_sink_threshold_validation(kwargs, message):
    with pytest.raises(ValueError) as error:
        FWSVDConfig(**kwargs)
    assert str(error.value) == message
