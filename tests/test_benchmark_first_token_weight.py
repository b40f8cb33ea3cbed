"""`benchmarks/first_token_weight.py`: the first-token parts of the gradient-weighted moments against brute force."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.first_token_weight import (
    FIRST_TOKEN_INPUT,
    FIRST_TOKEN_OUTPUT,
    first_token_scaled,
)
from hf_fwsvd.statistics import Statistics, collect

MODULE = "model.layers.0.self_attn.v_proj"


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    first = torch.randint(0, 50, (2, 6), generator=generator)
    second = torch.randint(0, 50, (3, 6), generator=generator)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding: this row's first real token is its third
    mask[2, 4:] = 0  # right padding
    return [
        {"input_ids": first, "attention_mask": torch.ones_like(first), "labels": first.clone()},
        {"input_ids": second, "attention_mask": mask, "labels": second.masked_fill(mask == 0, -100)},
    ]


def brute_force(model, data) -> dict[str, torch.Tensor]:
    """The four moments from each token's input and output gradient, one token at a time."""
    module = model.get_submodule(MODULE)
    sums = {key: 0.0 for key in ("c_first", "c_rest", "g_first", "g_rest")}
    examples = 0
    seen: dict[str, torch.Tensor] = {}
    for batch in data:
        seen.clear()
        handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out))
        output = model(**batch)
        handle.remove()
        seen["y"].retain_grad()
        output.loss.backward()
        size = batch["input_ids"].shape[0]
        grads = seen["y"].grad * size  # the gradient of the batch's summed per-example losses
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
def collected():
    model = tiny_model()
    names = ["gradient_second_moment", "output_gradient_second_moment", FIRST_TOKEN_INPUT, FIRST_TOKEN_OUTPUT]
    stats = collect(model, batches(), [MODULE], names, show_progress=False)
    return stats, brute_force(tiny_model(), batches())


def test_first_token_parts_match_brute_force(collected):
    stats, brute = collected
    torch.testing.assert_close(stats[FIRST_TOKEN_INPUT][MODULE], brute["c_first"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(stats[FIRST_TOKEN_OUTPUT][MODULE], brute["g_first"], rtol=1e-4, atol=1e-7)


def test_the_parts_are_parts_of_the_whole_moments(collected):
    stats, brute = collected
    whole = brute["c_first"] + brute["c_rest"]
    torch.testing.assert_close(stats["gradient_second_moment"][MODULE], whole, rtol=1e-4, atol=1e-7)


def test_weight_zero_drops_the_first_token(collected):
    stats, brute = collected
    dropped = first_token_scaled(stats, 0.0, (FIRST_TOKEN_INPUT, FIRST_TOKEN_OUTPUT))
    torch.testing.assert_close(dropped["gradient_second_moment"][MODULE], brute["c_rest"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dropped["output_gradient_second_moment"][MODULE], brute["g_rest"], rtol=1e-4, atol=1e-6)
    assert FIRST_TOKEN_INPUT not in dropped and FIRST_TOKEN_OUTPUT not in dropped


def test_a_weight_in_between_scales_only_the_first_token(collected):
    stats, brute = collected
    scaled = first_token_scaled(stats, 0.25, (FIRST_TOKEN_INPUT,))
    expected = 0.25 * brute["c_first"] + brute["c_rest"]
    torch.testing.assert_close(scaled["gradient_second_moment"][MODULE], expected, rtol=1e-4, atol=1e-6)
    # the output side is left as collected, and the collected tensors are not modified
    assert scaled["output_gradient_second_moment"][MODULE] is stats["output_gradient_second_moment"][MODULE]
    torch.testing.assert_close(
        stats["gradient_second_moment"][MODULE], brute["c_first"] + brute["c_rest"], rtol=1e-4, atol=1e-7
    )


def test_bad_weights_and_parts_are_refused():
    with pytest.raises(ValueError, match=r"The first token's weight must be in \[0, 1\], got 1.5."):
        first_token_scaled(Statistics(), 1.5, (FIRST_TOKEN_INPUT,))
    with pytest.raises(ValueError, match=r"Unknown first-token part\(s\) \['row_fisher'\]"):
        first_token_scaled(Statistics(), 0.5, ("row_fisher",))


def test_a_layer_without_a_token_axis_is_refused():
    layer = torch.nn.Linear(4, 3)
    data = [(torch.randn(5, 4), torch.randn(5, 3))]

    def loss(model, batch):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(model(inputs), targets)

    with pytest.raises(ValueError, match="needs the layer's input and output gradient as batch x tokens x features"):
        collect(layer, data, {"": layer}, [FIRST_TOKEN_INPUT], loss_fn=loss, show_progress=False)
