"""Batched per-example Fisher sums against brute force (a per-example `loss.backward()` loop)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_llama

from hf_fwsvd.fisher import estimate_fisher, per_example_squared_gradients, per_example_squared_sums


def _loop_reference(inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(inputs.shape[-1], dtype=torch.float64)
    for x, g in zip(inputs.double(), grads.double(), strict=True):
        total += (g.T @ x).square().sum(0)
    return total


@pytest.mark.parametrize("method", ["direct", "gram", "auto"], ids=["direct", "gram", "auto"])
@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 22], ids=["chunk1", "chunk-small", "chunk-default"])
@pytest.mark.parametrize("shape", [(5, 3, 7, 4), (4, 9, 3, 6)], ids=["tokens<features", "tokens>features"])
def test_per_example_squared_sums_matches_loop(method, chunk_elements, shape):
    examples, tokens, in_features, out_features = shape
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(examples, tokens, in_features, generator=generator)
    grads = torch.randn(examples, tokens, out_features, generator=generator)
    actual = per_example_squared_sums(inputs, grads, method=method, chunk_elements=chunk_elements)
    torch.testing.assert_close(actual.double(), _loop_reference(inputs, grads), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 22], ids=["chunk1", "chunk-small", "chunk-default"])
def test_per_example_squared_gradients_matches_loop(chunk_elements):
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(5, 6, 7, generator=generator)
    grads = torch.randn(5, 6, 4, generator=generator)
    expected = sum((g.double().T @ x.double()).square() for x, g in zip(inputs, grads, strict=True))
    actual = per_example_squared_gradients(inputs, grads, chunk_elements=chunk_elements)
    assert actual.shape == (4, 7)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


def test_per_example_squared_sums_rejects_unknown_method():
    with pytest.raises(ValueError, match="Unknown method 'fast'; choose 'auto', 'direct' or 'gram'."):
        per_example_squared_sums(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), method="fast")


def _brute_force_fisher(model, examples, names, loss_of):
    """Per-example loss.backward(), squared weight gradients summed over output rows, averaged over examples."""
    model.eval()
    modules = {name: model.get_submodule(name) for name in names}
    totals = {name: torch.zeros(module.weight.shape[1], dtype=torch.float64) for name, module in modules.items()}
    for example in examples:
        model.zero_grad()
        loss_of(model, example).backward()
        for name, module in modules.items():
            totals[name] += module.weight.grad.double().square().sum(0)
    model.zero_grad()
    return {name: total / len(examples) for name, total in totals.items()}


@pytest.mark.parametrize("arch", ["bert", "llama"], ids=["bert", "llama"])
def test_estimate_fisher_matches_per_example_backward(arch):
    torch.manual_seed(0)
    model = (tiny_bert if arch == "bert" else tiny_llama)(attn_implementation="eager")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (6, 7), generator=generator)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    names = [name for name in names if ".layers." in name or ".layer." in name]

    if arch == "bert":

        def loss_of(model, batch):
            return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        batches = [{"input_ids": ids[i : i + 3], "labels": labels[i : i + 3]} for i in (0, 3)]
        singles = [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(6)]
    else:
        # a per-example mean over tokens, averaged over the batch: exact per-example gradients after scaling
        def loss_of(model, batch):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            targets = batch["input_ids"][:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            return per_token.mean(-1).mean()

        batches = [{"input_ids": ids[i : i + 3]} for i in (0, 3)]
        singles = [{"input_ids": ids[i : i + 1]} for i in range(6)]

    expected = _brute_force_fisher(model, singles, names, loss_of)
    actual = estimate_fisher(model, batches, names, loss_fn=loss_of, show_progress=False)
    assert set(actual) == set(names)
    for name in names:
        torch.testing.assert_close(actual[name].double(), expected[name], rtol=1e-4, atol=1e-9, msg=name)
    assert all(param.grad is None or not param.grad.any() for param in model.parameters())
