"""Attention-sink modules kept dense under the global allocation (`hf_fwsvd.sinks`, `sink_threshold`)."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_llama

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.allocation import allocate_ranks
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.methods import required_statistics
from hf_fwsvd.sinks import first_token_shares, sink_modules
from hf_fwsvd.statistics import Statistics, collect
from hf_fwsvd.targets import find_target_modules


def _brute_force_energies(model, targets, batches) -> dict[str, tuple[float, float, int]]:
    """Per module: the summed |y|^2 of each row's first real token, of all real tokens, and the real token count."""
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
        first = total = 0.0
        count = 0
        for output, batch in zip(per_batch, batches, strict=True):
            for row, mask in zip(output.double(), batch["attention_mask"], strict=True):
                real = row[mask.bool()].square().sum(-1)
                first += float(real[0])
                total += float(real.sum())
                count += int(mask.sum())
        energies[name] = (first, total, count)
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
    shares = first_token_shares(stats)
    for name, (first, total, count) in expected.items():
        collected = stats["first_token_output_energy"][name].double()
        torch.testing.assert_close(
            collected, torch.tensor([first, total], dtype=torch.float64) / count, rtol=1e-5, atol=0
        )
        assert shares[name] == pytest.approx(first / total, rel=1e-5)
    assert len(set(round(share, 6) for share in shares.values())) > 1  # the shares really differ between modules


def test_sink_modules_are_those_above_the_threshold_in_model_order():
    stats = Statistics(
        {"first_token_output_energy": {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([1.0, 10.0]),
                                       "c": torch.tensor([3.0, 4.0]), "d": torch.tensor([0.0, 0.0])}}
    )  # fmt: skip
    assert first_token_shares(stats) == {"a": 0.5, "b": 0.1, "c": 0.75, "d": 0.0}
    assert sink_modules(stats, 0.2) == ["a", "c"]
    assert sink_modules(stats, 0.5) == ["c"]


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
    shares = first_token_shares(collect(model, loader, targets, ["first_token_output_energy"]))
    ordered = sorted(shares.values(), reverse=True)
    threshold = (ordered[1] + ordered[2]) / 2  # exactly two modules above it
    expected = [name for name, share in shares.items() if share > threshold]
    config = FWSVDConfig(method="kfac_whiten", param_budget=0.7, sink_threshold=threshold, calibration_dataset=data)
    assert "first_token_output_energy" in required_statistics(config)
    compress(model, config, show_progress=False)
    report = model.fwsvd_report
    assert len(expected) == 2 and set(expected) <= set(report.dense_modules)
    assert not set(expected) & {row.name for row in report.modules}
    low_rank = sum(row.params_after for row in report.modules)
    dense = sum(targets[name].weight.numel() for name in report.dense_modules)
    assert low_rank + dense <= int(0.7 * sum(module.weight.numel() for module in targets.values()))
    model.save_pretrained(tmp_path / "saved")
    reloaded = type(model).from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(param_budget=0.5, sink_threshold=1.0), "`sink_threshold` must be in (0, 1), got 1.0."),
        (dict(param_budget=0.5, sink_threshold=True), "`sink_threshold` must be a float in (0, 1), got True."),
        (
            dict(rank_ratio=0.5, sink_threshold=0.2),
            "`sink_threshold` keeps modules dense inside the global allocation; pass `param_budget=` with "
            'allocation="fisher" (the default there).',
        ),
        (
            dict(param_budget=0.5, allocation="uniform", sink_threshold=0.2),
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
