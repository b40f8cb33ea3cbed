"""`FWSVDConfig(first_token_weight=...)` (`hf_fwsvd.first_token_weight`): the first-token parts of the
gradient-weighted moments against brute force, and the reweighing inside `compress`."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_llama

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.first_token_weight import FIRST_TOKEN_PARTS, reweigh_first_token
from hf_fwsvd.methods import collect_statistics, required_statistics
from hf_fwsvd.statistics import Statistics, collect
from hf_fwsvd.targets import find_target_modules

MODULE = "model.layers.0.self_attn.v_proj"
C_PART = FIRST_TOKEN_PARTS["gradient_second_moment"]
G_PART = FIRST_TOKEN_PARTS["output_gradient_second_moment"]


def batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    first = torch.randint(3, 64, (2, 6), generator=generator)
    second = torch.randint(3, 64, (3, 6), generator=generator)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding: this row's first real token is its third
    mask[2, 4:] = 0  # right padding
    return [
        {"input_ids": first, "attention_mask": torch.ones_like(first), "labels": first.clone()},
        {"input_ids": second, "attention_mask": mask, "labels": second.masked_fill(mask == 0, -100)},
    ]


def seeded_llama():
    torch.manual_seed(0)
    return tiny_llama().eval()


def brute_force(model, data) -> dict[str, torch.Tensor]:
    """The first-token and other-token sums of ``C`` and ``G``, one token at a time from its own input and gradient."""
    module = model.get_submodule(MODULE)
    sums = {key: 0.0 for key in ("c_first", "c_rest", "g_first", "g_rest")}
    seen: dict[str, torch.Tensor] = {}
    examples = 0
    for batch in data:
        seen.clear()
        handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out))
        output = model(**batch)
        handle.remove()
        seen["y"].retain_grad()
        output.loss.backward()
        size = batch["input_ids"].shape[0]
        grads = seen["y"].grad * size  # each example's own gradient, as the collector scales the batch-mean loss's
        for row in range(size):
            real = batch["attention_mask"][row].nonzero().flatten().tolist()
            for token in real:
                x, g = seen["x"][row, token], grads[row, token]
                part = "first" if token == real[0] else "rest"
                sums[f"c_{part}"] = sums[f"c_{part}"] + g.square().sum() * torch.outer(x, x)
                sums[f"g_{part}"] = sums[f"g_{part}"] + torch.outer(g, g)
        model.zero_grad()
        examples += size
    return {key: value / examples for key, value in sums.items()}


@pytest.fixture(scope="module")
def collected() -> tuple[Statistics, dict[str, torch.Tensor]]:
    names = ["gradient_second_moment", "output_gradient_second_moment", C_PART, G_PART]
    stats = collect(seeded_llama(), batches(), [MODULE], names, show_progress=False)
    return stats, brute_force(seeded_llama(), batches())


def test_first_token_parts_match_brute_force_with_left_and_right_padding(collected):
    stats, brute = collected
    torch.testing.assert_close(stats[C_PART][MODULE], brute["c_first"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(stats[G_PART][MODULE], brute["g_first"], rtol=1e-4, atol=1e-7)
    whole = brute["c_first"] + brute["c_rest"]
    torch.testing.assert_close(stats["gradient_second_moment"][MODULE], whole, rtol=1e-4, atol=1e-7)


def test_weight_zero_leaves_the_first_token_out(collected):
    stats, brute = collected
    dropped = reweigh_first_token(stats, 0.0)
    torch.testing.assert_close(dropped["gradient_second_moment"][MODULE], brute["c_rest"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dropped["output_gradient_second_moment"][MODULE], brute["g_rest"], rtol=1e-4, atol=1e-6)
    assert C_PART not in dropped and G_PART not in dropped


def test_a_weight_in_between_scales_only_the_first_token_and_copies_nothing_back(collected):
    stats, brute = collected
    scaled = reweigh_first_token(stats, 0.25)
    expected = 0.25 * brute["g_first"] + brute["g_rest"]
    torch.testing.assert_close(scaled["output_gradient_second_moment"][MODULE], expected, rtol=1e-4, atol=1e-6)
    whole = brute["c_first"] + brute["c_rest"]
    torch.testing.assert_close(stats["gradient_second_moment"][MODULE], whole, rtol=1e-4, atol=1e-7)
    assert reweigh_first_token(stats, 1.0) is stats and reweigh_first_token(stats, None) is stats


def test_a_missing_part_is_named():
    stats = Statistics({"gradient_second_moment": {MODULE: torch.eye(2)}})
    with pytest.raises(ValueError, match="`first_token_weight` needs `first_token_gradient_second_moment` next to"):
        reweigh_first_token(stats, 0.5)


def test_a_layer_without_a_token_axis_is_refused():
    layer = torch.nn.Linear(4, 3)

    def loss(model, batch):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(model(inputs), targets)

    with pytest.raises(ValueError, match="needs the layer's input and output gradient as batch x tokens x features"):
        collect(layer, [(torch.randn(5, 4), torch.randn(5, 3))], {"": layer}, [C_PART], loss, show_progress=False)


@pytest.mark.parametrize(
    "method, parts",
    [("kfac_whiten", [C_PART, G_PART]), ("kfac_svdllm", [C_PART, G_PART]), ("fisher_whiten", [C_PART])],
)
def test_the_parts_are_required_only_below_weight_one(method, parts):
    needed = required_statistics(FWSVDConfig(method=method, rank=2, first_token_weight=0.1))
    assert [name for name in needed if name in FIRST_TOKEN_PARTS.values()] == parts
    for weight in (None, 1.0):
        assert not set(required_statistics(FWSVDConfig(method=method, rank=2, first_token_weight=weight))) & set(
            FIRST_TOKEN_PARTS.values()
        )


def test_a_method_without_gradient_weighted_moments_is_refused():
    with pytest.raises(ValueError, match=r"`first_token_weight=0.1` reweighs the gradient-weighted moments .* and "
                       r"method='whiten' reads neither"):  # fmt: skip
        required_statistics(FWSVDConfig(method="whiten", rank=2, first_token_weight=0.1))


@pytest.mark.parametrize("weight", [-0.1, 1.5, "0.1", True])
def test_the_weight_is_checked(weight):
    with pytest.raises(ValueError, match=r"`first_token_weight` must be a number in \[0, 1\], got"):
        FWSVDConfig(method="kfac_whiten", rank=2, first_token_weight=weight)


def test_compress_reweighs_the_moments_it_collects():
    data = calibration_data("llama", 16)
    config = FWSVDConfig(method="kfac_whiten", param_budget=0.6, first_token_weight=0.1, calibration_dataset=data)
    reweighed = seeded_llama()
    compress(reweighed, config, show_progress=False)
    # the same run from statistics reweighed by hand, with the plain config
    reference = seeded_llama()
    plain = FWSVDConfig(method="kfac_whiten", param_budget=0.6, calibration_dataset=data)
    targets = find_target_modules(reference, plain)
    stats = collect_statistics(reference, config, targets, show_progress=False)
    compress(reference, plain, show_progress=False, statistics=reweigh_first_token(stats, 0.1))
    assert reweighed.fwsvd_report.modules == reference.fwsvd_report.modules
    for name, parameter in reweighed.state_dict().items():
        torch.testing.assert_close(parameter, reference.state_dict()[name], rtol=0, atol=0)
    # and the weight changes the result (the first token's share is not negligible in a tiny model either)
    unweighted = seeded_llama()
    compress(unweighted, plain, show_progress=False)
    assert any(
        not torch.equal(parameter, unweighted.state_dict()[name]) for name, parameter in reweighed.state_dict().items()
    )
