"""Fisher importances against brute-force per-example gradients, and the model left as found."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_bert, tiny_gpt2
from torch import nn

from hf_fwsvd import estimate_fisher
from hf_fwsvd.calibration import build_calibration_loader


def brute_force(model, examples, names, loss_of_example):
    """Per-example loss.backward(), squared weight gradients summed over output rows, averaged over examples."""
    totals = {name: 0.0 for name in names}
    for example in examples:
        model.zero_grad()
        loss_of_example(model, example).backward()
        for name in names:
            module = model.get_submodule(name)
            grad = module.weight.grad if isinstance(module, nn.Linear) else module.weight.grad.T  # Conv1D: in x out
            totals[name] = totals[name] + grad.pow(2).sum(0)
    model.zero_grad(set_to_none=True)
    return {name: total / len(examples) for name, total in totals.items()}


def test_two_layer_mlp_matches_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    inputs, targets = torch.randn(12, 6), torch.randint(0, 3, (12,))
    batches = [{"x": inputs[i : i + 4], "y": targets[i : i + 4]} for i in range(0, 12, 4)]

    def loss_fn(module, batch):
        return nn.functional.cross_entropy(module(batch["x"]), batch["y"])

    fisher = estimate_fisher(model, batches, ["0", "2"], loss_fn=loss_fn, show_progress=False)
    expected = brute_force(
        model,
        [{"x": inputs[i : i + 1], "y": targets[i : i + 1]} for i in range(12)],
        ["0", "2"],
        loss_fn,
    )
    for name in ("0", "2"):
        assert fisher[name].shape == (model.get_submodule(name).in_features,)
        assert torch.allclose(fisher[name], expected[name], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("arch", ["bert", "gpt2"], ids=["bert-3d", "gpt2-conv1d"])
def test_transformer_matches_brute_force(arch):
    torch.manual_seed(0)
    model = (tiny_bert if arch == "bert" else tiny_gpt2)().eval()
    # Equal lengths: a causal LM's loss is a mean over tokens, so per-example gradients recovered from a batch equal
    # the single-example ones only when every example has the same number of tokens.
    examples = [example for example in calibration_data(arch, 20) if len(example["input_ids"]) == 6]
    loader = build_calibration_loader(examples, model=model, batch_size=4)
    names = [n for n, m in model.named_modules() if n.endswith(("query", "output.dense", "c_attn", "c_fc"))]
    fisher = estimate_fisher(model, loader, names, show_progress=False)
    singles = [batch for batch in build_calibration_loader(examples, model=model, batch_size=1)]
    expected = brute_force(model, singles, names, lambda m, b: m(**b).loss)
    for name in names:
        assert torch.allclose(fisher[name], expected[name], rtol=1e-4, atol=1e-12), name


def test_model_left_exactly_as_found():
    model = tiny_bert()
    model.train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    loader = build_calibration_loader(calibration_data("bert"), model=model, batch_size=4)
    estimate_fisher(model, loader, ["bert.encoder.layer.0.attention.self.query"], show_progress=False)
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_hooks_removed_even_when_loss_fails():
    model = tiny_bert()
    loader = build_calibration_loader(calibration_data("bert"), model=model, batch_size=4)

    def nan_loss(module, batch):
        return module(**batch).loss * float("nan")

    with pytest.raises(ValueError, match="calibration loss is nan"):
        estimate_fisher(model, loader, ["bert.encoder.layer.0.attention.self.query"], loss_fn=nan_loss)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_base_model_without_head_gets_clear_error():
    from transformers import BertModel

    model = BertModel(tiny_bert().config)
    loader = build_calibration_loader(calibration_data("bert"), model=model, batch_size=4)
    with pytest.raises(ValueError, match="returned no loss"):
        estimate_fisher(model, loader, ["encoder.layer.0.attention.self.query"], show_progress=False)
