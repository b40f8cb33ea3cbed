"""Matrix input weighting (whitening), activation statistics and the Fisher extras against brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, gpt2_equal_length_setup, tiny_bert
from test_fisher import brute_force
from torch import nn

from hf_fwsvd.activations import collect_activation_statistics
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.factorize import factorize, input_weighting, relative_errors
from hf_fwsvd.fisher import estimate_fisher_statistics


def output_error(weight, approximation, inputs):
    return ((inputs @ (weight - approximation).T).square().sum() / inputs.shape[0]).item()


def test_whitening_truncated_singular_values_equal_output_error():
    torch.manual_seed(0)
    weight = torch.randn(10, 8, dtype=torch.float64)
    inputs = torch.randn(50, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)  # correlated
    moment = inputs.T @ inputs / inputs.shape[0]
    factors = factorize(weight, 3, moment.float(), floor=0.0)
    root = torch.linalg.cholesky(moment)
    singular = torch.linalg.svdvals(weight @ root)
    expected = singular[3:].square().sum().item()
    assert output_error(weight, factors.product().double(), inputs) == pytest.approx(expected, rel=1e-4)


def test_whitening_beats_every_other_method_on_output_error():
    torch.manual_seed(1)
    weight = torch.randn(12, 10)
    inputs = torch.randn(200, 10) * torch.logspace(-2, 1, 10)  # outlier features
    inputs = inputs @ torch.linalg.qr(torch.randn(10, 10))[0]
    moment = inputs.T @ inputs / inputs.shape[0]
    whitened = output_error(weight, factorize(weight, 4, moment).product(), inputs)
    for other in (None, moment.diagonal(), inputs.abs().mean(0)):
        assert whitened < output_error(weight, factorize(weight, 4, other).product(), inputs)


def test_rank_deficient_activations_need_no_inverse():
    torch.manual_seed(2)
    weight = torch.randn(9, 8)
    inputs = torch.randn(40, 3) @ torch.randn(3, 8)  # X^T X has rank 3 of 8
    moment = inputs.T @ inputs / inputs.shape[0]
    assert torch.linalg.matrix_rank(moment) == 3
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(moment.double() - 1e-12 * torch.eye(8, dtype=torch.float64))
    for rank in (2, 3, 5):
        factors = factorize(weight, rank, moment, floor=0.0)
        assert torch.isfinite(factors.down).all() and torch.isfinite(factors.up).all()
    # rank 3 reproduces every seen input exactly; the floor's tie-break keeps unseen directions like plain SVD
    assert output_error(weight, factorize(weight, 3, moment).product(), inputs) < 1e-8
    exact = factorize(weight, 3, moment).product()
    assert relative_errors(weight, exact, moment)["weighted"] < 1e-4
    assert torch.isfinite(input_weighting(torch.zeros(8, 8).fill_diagonal_(0.0) + moment)).all()


def test_identity_and_diagonal_matrices_match_svd_and_vector_weighting():
    torch.manual_seed(3)
    weight = torch.randn(7, 6)
    plain = factorize(weight, 2)
    assert torch.allclose(factorize(weight, 2, 3.0 * torch.eye(6)).product(), plain.product(), atol=1e-5)
    scales = torch.rand(6) + 0.1
    assert torch.allclose(
        factorize(weight, 2, torch.diag(scales)).product(), factorize(weight, 2, scales).product(), atol=1e-5
    )


@pytest.mark.parametrize(
    "matrix, message",
    [
        (torch.eye(5), r"shape \(5, 5\), expected \(6, 6\)"),
        (torch.full((6, 6), float("nan")), "NaN/Inf"),
        (-torch.eye(6), "negative diagonal"),
        (torch.zeros(6, 6), "all zeros"),
        (torch.eye(6) + torch.triu(torch.ones(6, 6), 1), "not symmetric"),
    ],
    ids=["shape", "nan", "negative", "zero", "asymmetric"],
)
def test_bad_importance_matrix_raises_naming_module(matrix, message):
    with pytest.raises(ValueError, match=f"`layer.q`.*{message}|{message}"):
        factorize(torch.randn(4, 6), 2, matrix, name="layer.q")


def test_activation_statistics_match_brute_force_and_skip_padding():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    examples = calibration_data("bert", 6)
    loader = build_calibration_loader(examples, model=model, batch_size=3)
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    stats = collect_activation_statistics(model, loader, names, show_progress=False)
    captured = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: captured[n].append(a[0][0]))
        for name in names
    ]
    with torch.no_grad():
        for example in examples:  # one unpadded example at a time
            model(input_ids=torch.tensor([example["input_ids"]]))
    for handle in handles:
        handle.remove()
    for name in names:
        rows = torch.cat(captured[name])
        assert stats.tokens[name] == sum(len(e["input_ids"]) for e in examples) == rows.shape[0]
        assert torch.allclose(stats.second_moment[name], rows.T @ rows / rows.shape[0], atol=1e-5)
        assert torch.allclose(stats.abs_mean[name], rows.abs().mean(0), atol=1e-6)
    assert not model.training and not any(m._forward_hooks for m in model.modules())


def test_elementwise_fisher_and_second_moment_match_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    inputs, targets = torch.randn(12, 6), torch.randint(0, 3, (12,))
    batches = [{"x": inputs[i : i + 4], "y": targets[i : i + 4]} for i in range(0, 12, 4)]

    def loss_fn(module, batch):
        return nn.functional.cross_entropy(module(batch["x"]), batch["y"])

    stats = estimate_fisher_statistics(
        model, batches, ["0", "2"], loss_fn, show_progress=False, elementwise=True, second_moment=True
    )
    expected_elements = {"0": 0.0, "2": 0.0}
    expected_moment = {"0": 0.0, "2": 0.0}
    hidden = {}
    handle = model[2].register_forward_hook(lambda m, a, o: hidden.update(x=a[0]))
    for i in range(12):
        model.zero_grad()
        out = model(inputs[i : i + 1])
        out.retain_grad()
        nn.functional.cross_entropy(out, targets[i : i + 1]).backward()
        for name in ("0", "2"):
            expected_elements[name] = expected_elements[name] + model.get_submodule(name).weight.grad.square()
        x2, g2 = hidden["x"].detach(), out.grad
        expected_moment["2"] = expected_moment["2"] + g2.square().sum() * x2.T @ x2
    handle.remove()
    for name in ("0", "2"):
        assert torch.allclose(stats.elementwise[name], expected_elements[name] / 12, rtol=1e-5, atol=1e-10)
        assert torch.allclose(stats.elementwise[name].sum(0), stats.importance[name], rtol=1e-5, atol=1e-10)
    assert torch.allclose(stats.second_moment["2"], expected_moment["2"] / 12, rtol=1e-5, atol=1e-10)
    # for one token per example the moment's diagonal is the row Fisher
    assert torch.allclose(stats.second_moment["0"].diagonal(), stats.importance["0"], rtol=1e-5, atol=1e-10)


def test_elementwise_fisher_matches_brute_force_on_sequences():
    model, examples, names, loader = gpt2_equal_length_setup()
    stats = estimate_fisher_statistics(model, loader, names, show_progress=False, elementwise=True)
    singles = list(build_calibration_loader(examples, model=model, batch_size=1))
    expected = brute_force(model, singles, names, lambda m, b: m(**b).loss)
    for name in names:
        assert stats.elementwise[name].shape == model.get_submodule(name).weight.T.shape
        assert torch.allclose(stats.elementwise[name].sum(0), expected[name], rtol=1e-4, atol=1e-12)
