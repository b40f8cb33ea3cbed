"""Per-token gradient weights (`hf_fwsvd.token_weights`) and the token-weighted sequential update."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compressed_with_loader, tiny_llama

from hf_fwsvd.lstsq_update import sequential_update
from hf_fwsvd.statistics import collect
from hf_fwsvd.token_weights import output_gradient_token_weights


def _setup(method: str = "svd"):
    return compressed_with_loader(tiny_llama, method)


def _module_inputs(model, name: str, loader) -> list[torch.Tensor]:
    """The float64 inputs of module `name` in each batch (``batch x tokens x in``), forward only."""
    inputs: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: inputs.append(a[0].detach().double()))
    with torch.no_grad():
        for batch in loader:
            model(**{key: value for key, value in batch.items() if key != "labels"})
    handle.remove()
    return inputs


def test_token_weights_rebuild_the_gradient_weighted_second_moment():
    """sum_t |g_t|^2 x_t x_t^T from the per-token weights equals the collector's `gradient_second_moment`."""
    dense, _, targets, loader = _setup()
    weights = output_gradient_token_weights(dense, targets, loader)
    reference = collect(dense, loader, targets, ["gradient_second_moment"])["gradient_second_moment"]
    examples = sum(batch["input_ids"].shape[0] for batch in loader)
    for name in targets:
        assert len(weights[name]) == 2 and weights[name][0].shape == (4, 16)
        inputs = _module_inputs(dense, name, loader)
        rebuilt = sum(
            (x * w.double()[..., None]).flatten(0, 1).T @ x.flatten(0, 1)
            for x, w in zip(inputs, weights[name], strict=True)
        )
        torch.testing.assert_close(rebuilt / examples, reference[name].double(), rtol=1e-4, atol=1e-9)
    assert all(param.grad is None for param in dense.parameters())  # the dense model is left as it was


def test_token_weights_match_autograd_at_every_module_output():
    dense, _, targets, loader = _setup()
    names = list(targets)[:3]
    weights = output_gradient_token_weights(dense, names, loader)
    batch = next(iter(loader))
    outputs = {}
    handles = [
        dense.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o)) for n in names
    ]
    embeddings = dense.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    loss = dense(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    for handle in handles:
        handle.remove()
    for name, grad in zip(names, grads, strict=True):
        torch.testing.assert_close(weights[name][0], grad.pow(2).sum(-1) * 16, rtol=1e-5, atol=1e-12)


def test_unit_token_weights_give_the_unweighted_update_bit_for_bit():
    _, compressed, targets, loader = _setup()
    plain, weighted = copy.deepcopy(compressed), copy.deepcopy(compressed)
    sequential_update(plain, dict(targets), loader)
    ones = {name: [torch.ones(4, 16), torch.ones(4, 16)] for name in targets}
    sequential_update(weighted, dict(targets), loader, token_weights=ones)
    for name in targets:
        assert torch.equal(plain.get_submodule(name).up.weight, weighted.get_submodule(name).up.weight), name


def test_weighted_update_is_the_weighted_least_squares_optimum_in_the_first_block():
    """Block 0 sees the dense model's inputs: its `up` solves min_A sum_t w_t |W x_t - A B x_t|^2 (brute force)."""
    dense, compressed, targets, loader = _setup()
    weights = output_gradient_token_weights(dense, targets, loader)
    report = sequential_update(compressed, dict(targets), loader, token_weights=weights)
    first = [name for name in targets if ".layers.0." in name]
    assert first
    for name in first:
        inputs = torch.cat([x.flatten(0, 1) for x in _module_inputs(dense, name, loader)])
        scale = torch.cat([w.flatten() for w in weights[name]]).double().sqrt()[:, None]
        down = compressed.get_submodule(name).down.weight.detach().double()
        weight = targets[name].weight.detach().double()
        # min_A || diag(s) X B^T A^T - diag(s) X W^T ||_F
        expected = torch.linalg.lstsq(scale * inputs @ down.T, scale * inputs @ weight.T).solution.T
        torch.testing.assert_close(compressed.get_submodule(name).up.weight.double(), expected, rtol=1e-3, atol=1e-5)
    for name, (before, after) in report.errors.items():
        assert after <= before, name


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (lambda names: {}, "`token_weights` has no weights for `{first}`; collect them for every compressed module."),
        (
            lambda names: {n: [torch.ones(4, 16)] for n in names},
            "`token_weights['{first}']` has 1 batches, the calibration data more; pass the batches the weights were "
            "collected on.",
        ),
        (
            lambda names: {n: [torch.ones(4, 15)] * 2 for n in names},
            "`token_weights['{first}']` batch 0 has shape (4, 15), the module's input (4, 16) tokens; pass the "
            "batches the weights were collected on.",
        ),
    ],
    ids=["missing-module", "missing-batch", "wrong-shape"],
)
def test_token_weights_that_do_not_fit_the_batches_are_refused(weights, message):
    _, compressed, targets, loader = _setup()
    first = next(iter(targets))
    with pytest.raises(ValueError) as error:
        sequential_update(compressed, dict(targets), loader, token_weights=weights(list(targets)))
    assert str(error.value) == message.format(first=first)


def test_token_weights_refuse_a_module_that_does_not_run():
    dense, _, _, loader = _setup()
    dense.unused = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError) as error:
        output_gradient_token_weights(dense, ["model.layers.0.mlp.down_proj", "unused"], loader)
    assert str(error.value) == "`unused` did not run in the forward pass of batch 0."
