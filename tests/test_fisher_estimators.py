"""The three Fisher estimators (`fisher_estimator=`) against brute force on tiny models.

- ``"batch"``: one ``loss.backward()`` per batch, squared weight gradient summed over output rows, mean over batches.
- ``"true"``: with the same label draws, equal to the per-example brute force on the drawn labels; and, over many
  draws, close to the exact expectation ``sum_c p_c (d(-log p_c)/dW)^2`` (classification) or ``4 (df/dW)^2``
  (regression, unit-variance Gaussian targets under the mean squared error).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, tiny_bert
from torch import nn

from hf_fwsvd import FWSVDConfig, estimate_fisher
from hf_fwsvd.fisher import sampled_label_loss


class TinyClassifier(nn.Module):
    """A two-layer MLP with a transformers-like interface: ``model(x=..., labels=...)`` has ``.logits``, ``.loss``."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(problem_type="regression" if classes == 1 else None, num_labels=classes)
        self.hidden = nn.Linear(5, 4)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.head(torch.tanh(self.hidden(x)))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits, labels)
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


NAMES = ("hidden", "head")


def _squared_grad_rows(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: model.get_submodule(name).weight.grad.double().square().sum(0) for name in NAMES}


def test_batch_estimator_matches_squared_batch_gradients():
    torch.manual_seed(0)
    model = TinyClassifier()
    inputs, labels = torch.randn(12, 5), torch.randint(0, 3, (12,))
    batches = [{"x": inputs[i : i + 4], "labels": labels[i : i + 4]} for i in range(0, 12, 4)]
    fisher = estimate_fisher(model, batches, list(NAMES), show_progress=False, estimator="batch")
    expected = {name: torch.zeros(model.get_submodule(name).in_features, dtype=torch.float64) for name in NAMES}
    for batch in batches:
        for name, value in _squared_grad_rows(model, model(**batch).loss).items():
            expected[name] += value / len(batches)
    for name in NAMES:
        assert torch.allclose(fisher[name].double(), expected[name], rtol=1e-5, atol=1e-12), name
    empirical = estimate_fisher(model, batches, list(NAMES), show_progress=False)
    assert not torch.allclose(fisher["hidden"], empirical["hidden"], rtol=1e-2)


def test_batch_estimator_on_a_transformer_matches_brute_force():
    torch.manual_seed(0)
    model = tiny_bert(attn_implementation="eager").eval()
    ids = torch.randint(3, VOCAB, (6, 7), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layer." in name]
    batches = [{"input_ids": ids[i : i + 3], "labels": labels[i : i + 3]} for i in (0, 3)]
    fisher = estimate_fisher(model, batches, names, show_progress=False, estimator="batch")
    expected = {name: 0.0 for name in names}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for name in names:
            expected[name] = expected[name] + model.get_submodule(name).weight.grad.double().square().sum(0) / 2
    model.zero_grad(set_to_none=True)
    for name in names:
        assert torch.allclose(fisher[name].double(), expected[name], rtol=1e-4, atol=1e-12), name


def test_true_estimator_equals_empirical_fisher_on_the_drawn_labels():
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    inputs = torch.randn(12, 5)
    batches = [{"x": inputs[i : i + 4]} for i in range(0, 12, 4)]  # no labels needed
    fisher = estimate_fisher(model, batches, list(NAMES), show_progress=False, estimator="true")
    # the estimator's draws: seed 0, one multinomial draw per batch, in batch order
    generator = torch.Generator().manual_seed(0)
    drawn = []
    with torch.no_grad():
        for batch in batches:
            drawn.append(torch.multinomial(model(**batch).logits.softmax(-1), 1, generator=generator).squeeze(-1))
    drawn = torch.cat(drawn)
    expected = {name: 0.0 for name in NAMES}
    for i in range(12):
        loss = nn.functional.cross_entropy(model(x=inputs[i : i + 1]).logits, drawn[i : i + 1])
        for name, value in _squared_grad_rows(model, loss).items():
            expected[name] = expected[name] + value / 12
    for name in NAMES:
        assert torch.allclose(fisher[name].double(), expected[name], rtol=1e-5, atol=1e-12), name


@pytest.mark.parametrize("classes", [3, 1], ids=["classification", "regression"])
def test_true_estimator_converges_to_the_exact_fisher(classes):
    torch.manual_seed(0)
    model = TinyClassifier(classes).eval()
    inputs = torch.randn(4, 5)
    exact = {name: 0.0 for name in NAMES}
    for i in range(4):
        logits = model(x=inputs[i : i + 1]).logits
        if classes == 1:  # MSE (f - y)^2 with y ~ N(f, 1): E[(dL/dW)^2] = E[4 e^2] (df/dW)^2 = 4 (df/dW)^2
            for name, value in _squared_grad_rows(model, logits.sum()).items():
                exact[name] = exact[name] + 4 * value / 4
            continue
        probs = logits.detach().softmax(-1)[0]
        for c in range(classes):
            loss = nn.functional.cross_entropy(model(x=inputs[i : i + 1]).logits, torch.tensor([c]))
            for name, value in _squared_grad_rows(model, loss).items():
                exact[name] = exact[name] + probs[c].double() * value / 4
    batches = [{"x": inputs.repeat(1000, 1)} for _ in range(3)]  # 3,000 draws per input
    fisher = estimate_fisher(model, batches, list(NAMES), show_progress=False, estimator="true")
    for name in NAMES:
        assert torch.allclose(fisher[name].double(), exact[name], rtol=0.06), (name, fisher[name], exact[name])


def test_sampled_label_loss_masks_padding_for_token_logits():
    class TokenModel(nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 4, requires_grad=True))

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    loss = sampled_label_loss(TokenModel(), batch, torch.Generator().manual_seed(0))
    assert torch.allclose(loss, torch.log(torch.tensor(4.0)))  # uniform logits: -log(1/4) on each real token


def test_estimator_errors_name_the_fix():
    model = TinyClassifier()
    batches = [{"x": torch.randn(2, 5), "labels": torch.tensor([0, 1])}]
    with pytest.raises(ValueError) as error:
        estimate_fisher(model, batches, list(NAMES), show_progress=False, estimator="exact")
    assert str(error.value) == "Unknown Fisher estimator 'exact'; choose one of empirical, true, batch."
    with pytest.raises(ValueError) as error:
        estimate_fisher(model, batches, list(NAMES), loss_fn=lambda m, b: m(**b).loss, estimator="true")
    assert str(error.value) == (
        "estimator='true' draws the labels from the model and computes its own loss; it cannot be combined with a "
        "custom `loss_fn`. Use the default loss, or estimator='empirical'."
    )
    with pytest.raises(ValueError) as error:
        FWSVDConfig(fisher_estimator="exact")
    assert str(error.value) == "Unknown fisher_estimator 'exact'; choose one of empirical, true, batch."
    assert FWSVDConfig(fisher_estimator="true").to_dict()["fisher_estimator"] == "true"


@pytest.mark.parametrize("estimator", ["true", "batch"])
def test_config_estimator_reaches_the_calibration_pass(estimator):
    from conftest import calibration_data

    from hf_fwsvd import compute_importances
    from hf_fwsvd.calibration import build_calibration_loader

    torch.manual_seed(0)
    model = tiny_bert().eval()
    with torch.no_grad():  # confident predictions: near p = 1/2 the true and empirical Fisher of two classes coincide
        model.classifier.weight.mul_(50)
    examples = calibration_data("bert", 8)
    config = FWSVDConfig(calibration_dataset=examples, num_samples=None, batch_size=4, fisher_estimator=estimator)
    via_config = compute_importances(model, config, show_progress=False)
    loader = build_calibration_loader(examples, model=model, batch_size=4)
    names = list(via_config)
    direct = estimate_fisher(model, loader, names, show_progress=False, estimator=estimator)
    empirical = estimate_fisher(model, loader, names, show_progress=False)
    for name in names:
        assert torch.allclose(via_config[name], direct[name], rtol=1e-5, atol=1e-12), name
    assert any(not torch.allclose(via_config[n], empirical[n], rtol=1e-3) for n in names)
