"""Weight sharing: a module used several times per forward pass (ALBERT) gets the Fisher of its total gradient.

Brute force: every example's loss alone, its weight gradient by autograd (which sums over the module's uses), squared,
averaged over examples. The estimator sees the module's uses one at a time through hooks and must join them first.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AlbertConfig, AlbertForSequenceClassification

from hf_fwsvd.fisher import estimate_fisher_statistics


class SharedTwice(nn.Module):
    """`shared` is applied twice; inputs are ``batch x in`` or ``batch x tokens x in`` (then mean-pooled)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.shared(torch.tanh(self.shared(x)))
        logits = self.head(hidden if hidden.ndim == 2 else hidden.mean(1))
        return nn.functional.cross_entropy(logits, labels)


def _toy_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"], batch["labels"])


def _albert_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def _brute_force(model, examples, loss_fn, names):
    """Per-example squared gradients of each named module's weight: row sums and element-wise, both averaged."""
    params = [model.get_submodule(name).weight for name in names]
    rows = {name: torch.zeros(param.shape[1], dtype=torch.float64) for name, param in zip(names, params, strict=True)}
    elements = {name: torch.zeros(param.shape, dtype=torch.float64) for name, param in zip(names, params, strict=True)}
    for example in examples:
        for param in params:
            param.requires_grad_(True)
        grads = torch.autograd.grad(loss_fn(model, example), params)
        for name, grad in zip(names, grads, strict=True):
            rows[name] += grad.double().square().sum(0)
            elements[name] += grad.double().square()
    return {k: v / len(examples) for k, v in rows.items()}, {k: v / len(examples) for k, v in elements.items()}


def _per_use_sum(model, examples):
    """What summing squares per use would give for `shared` (the bug): sum_u (g_u^T x_u)^2, not (sum_u g_u^T x_u)^2."""
    total = torch.zeros(6, dtype=torch.float64)
    captured = []

    def keep(module, args, output):
        output.retain_grad()
        captured.append((args[0].detach(), output))

    handle = model.shared.register_forward_hook(keep)
    for example in examples:
        captured.clear()
        _toy_loss(model, example).backward()
        for inputs, output in captured:
            grad = output.grad.reshape(-1, 6).T.double() @ inputs.reshape(-1, 6).double()
            total += grad.square().sum(0)
    handle.remove()
    model.zero_grad()
    return total / len(examples)


@pytest.mark.parametrize("tokens", [None, 5], ids=["one-row-per-example", "five-tokens-per-example"])
def test_shared_module_fisher_is_that_of_the_total_gradient(tokens):
    torch.manual_seed(0)
    model = SharedTwice()
    shape = (10, 6) if tokens is None else (10, tokens, 6)
    data = {"x": torch.randn(*shape), "labels": torch.randint(0, 3, (10,))}
    examples = [{key: value[index : index + 1] for key, value in data.items()} for index in range(10)]
    batches = [{key: value[start : start + 4] for key, value in data.items()} for start in range(0, 10, 4)]
    names = ["shared", "head"]
    stats = estimate_fisher_statistics(model, batches, names, _toy_loss, show_progress=False, elementwise=True)
    rows, elements = _brute_force(model, examples, _toy_loss, names)
    for name in names:
        torch.testing.assert_close(stats.importance[name].double(), rows[name], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(stats.elementwise[name].double(), elements[name], rtol=1e-4, atol=1e-9)
    wrong = _per_use_sum(model, examples)
    assert not torch.allclose(wrong, rows["shared"], rtol=0.05)  # the check above can tell the two apart
    assert all(not param.requires_grad or param.grad is None for param in model.parameters())


def test_albert_shared_layer_fisher_matches_per_example_autograd():
    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    model = AlbertForSequenceClassification(config).eval()
    data = {
        "input_ids": torch.randint(1, 64, (6, 7)),
        "attention_mask": torch.ones(6, 7, dtype=torch.long),
        "labels": torch.randint(0, 2, (6,)),
    }
    examples = [{key: value[index : index + 1] for key, value in data.items()} for index in range(6)]
    batches = [{key: value[start : start + 3] for key, value in data.items()} for start in (0, 3)]
    layer = "albert.encoder.albert_layer_groups.0.albert_layers.0"
    names = [
        f"{layer}.attention.query",
        f"{layer}.ffn",
        f"{layer}.ffn_output",
        "albert.encoder.embedding_hidden_mapping_in",
    ]
    stats = estimate_fisher_statistics(model, batches, names, _albert_loss, show_progress=False)
    rows, _ = _brute_force(model, examples, _albert_loss, names)
    for name in names:
        torch.testing.assert_close(stats.importance[name].double(), rows[name], rtol=1e-3, atol=1e-12)
