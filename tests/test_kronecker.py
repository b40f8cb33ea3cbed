"""The Kronecker-factored (two-sided) weighting: `hf_fwsvd.kronecker`, its statistic and `method="kfac_whiten"`."""

from __future__ import annotations

import pytest
import torch
from conftest import gpt2_equal_length_setup

from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.factorize import factorize
from hf_fwsvd.kronecker import OUTPUT_DAMPING, kronecker_factorize, kronecker_weighted_matrix, output_weighting
from hf_fwsvd.methods import get_method
from hf_fwsvd.statistics import collect


def random_moment(size: int, samples: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(samples, size, generator=generator) @ torch.randn(size, size, generator=generator)
    return rows.T @ rows / samples


def two_sided_loss(weight, approximation, output_moment, input_moment) -> float:
    """``tr(G dW C dW^T)`` in float64."""
    delta = (weight - approximation).double()
    return float(torch.trace(output_moment.double() @ delta @ input_moment.double() @ delta.T))


def brute_force_optimum(weight, rank, output_moment, input_moment) -> float:
    """Eckart-Young on ``L_G^T W L_C`` with the damped, normalised ``G`` the factorisation uses, in the same units."""
    peak = output_moment.diagonal().max().double()
    damped = output_moment.double() / peak + OUTPUT_DAMPING * torch.eye(output_moment.shape[0], dtype=torch.float64)
    left = torch.linalg.cholesky(damped)
    right = torch.linalg.cholesky(input_moment.double())
    singular = torch.linalg.svdvals(left.T @ weight.double() @ right)
    return float(singular[rank:].square().sum()) * float(peak)


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_factorisation_reaches_the_brute_force_optimum(rank):
    weight = torch.randn(12, 10, generator=torch.Generator().manual_seed(1))
    output_moment, input_moment = random_moment(12, 200, 2), random_moment(10, 200, 3)
    factors = kronecker_factorize(weight, rank, input_moment, output_moment)
    peak = output_moment.diagonal().max()
    damped = output_moment + OUTPUT_DAMPING * peak * torch.eye(12)
    reached = two_sided_loss(weight, factors.product(), damped, input_moment)
    assert reached == pytest.approx(brute_force_optimum(weight, rank, output_moment, input_moment), rel=1e-4)
    assert factors.down.shape == (rank, 10) and factors.up.shape == (12, rank)
    # never worse than the one-sided weighting on the two-sided objective, and strictly better here
    one_sided = factorize(weight, rank, input_moment).product()
    assert reached < two_sided_loss(weight, one_sided, damped, input_moment) * (1 - 1e-3)


def test_up_is_orthonormal_and_the_product_is_the_unscaled_optimum_under_weak_gradients():
    # weak output directions make L^{-T} U_r large (columns of norm ~1e2 here); the factors must still come back in
    # the convention of every other method (orthonormal `up`), else a fine-tune's steps wreck the small `down`
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(12, 10, generator=generator)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))[0]
    # one strong output direction, eleven with 1e-4 of its gradient energy (G is dominated by a few directions)
    spectrum = torch.cat([torch.ones(1), torch.logspace(-4, -5, 11)]).double()
    output_moment = (basis * spectrum) @ basis.T
    input_moment = random_moment(10, 200, 8)
    factors = kronecker_factorize(weight, 4, input_moment, output_moment.float())
    assert torch.allclose(factors.up.T @ factors.up, torch.eye(4), atol=1e-5)
    left = torch.linalg.cholesky(output_moment / output_moment.diagonal().max() + OUTPUT_DAMPING * torch.eye(12))
    right = torch.linalg.cholesky(input_moment.double())
    u, _, _ = torch.linalg.svd(left.T @ weight.double() @ right)
    unscaled_up = torch.linalg.solve_triangular(left.T, u[:, :4], upper=True)
    assert unscaled_up.norm(dim=0).max() > 50  # the case this test is about
    expected = unscaled_up @ u[:, :4].T @ left.T @ weight.double()
    # float32 rounding of the weighted matrix (8.3e-5 here, the same before the QR was added)
    assert (factors.product().double() - expected).norm() / expected.norm() < 2e-4


def test_identity_output_moment_gives_the_one_sided_factorisation():
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    input_moment = random_moment(6, 100, 5)
    two_sided = kronecker_factorize(weight, 3, input_moment, 2.5 * torch.eye(8)).product()
    assert torch.allclose(two_sided, factorize(weight, 3, input_moment).product(), atol=1e-5)


def test_weighted_matrix_spectrum_is_the_objective():
    """The squared singular values dropped from `kronecker_weighted_matrix` are the normalised two-sided loss."""
    weight = torch.randn(9, 7, generator=torch.Generator().manual_seed(6))
    output_moment, input_moment = random_moment(9, 150, 7), random_moment(7, 150, 8)
    values = torch.linalg.svdvals(kronecker_weighted_matrix(weight, input_moment, output_moment).double()).square()
    factors = kronecker_factorize(weight, 4, input_moment, output_moment)
    scale = float(output_moment.diagonal().max() * input_moment.diagonal().max())
    damped = output_moment + OUTPUT_DAMPING * output_moment.diagonal().max() * torch.eye(9)
    loss = two_sided_loss(weight, factors.product(), damped, input_moment) / scale
    assert float(values[4:].sum()) == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize(
    ("moment", "message"),
    [
        (torch.zeros(4, 3), "Output-gradient second moment for `layer` has shape (4, 3), expected a square out x out"),
        (torch.zeros(4, 4), "Output-gradient second moment for `layer` is all zeros: the task loss has no gradient"),
        (torch.full((4, 4), float("nan")), "Output-gradient second moment for `layer` has NaN/Inf values"),
    ],
)
def test_bad_output_moment_raises_naming_the_module(moment, message):
    with pytest.raises(ValueError) as error:
        output_weighting(moment, name="layer")
    assert str(error.value).startswith(message)


def test_mismatched_output_moment_raises_naming_the_module():
    with pytest.raises(ValueError) as error:
        kronecker_factorize(torch.randn(4, 3), 2, None, torch.eye(5), name="blocks.0.fc")
    assert str(error.value) == (
        "Output-gradient second moment for `blocks.0.fc` has shape (5, 5), expected (4, 4) for its (4, 3) weight. "
        "Recompute the statistics for this model."
    )


def test_output_gradient_moment_matches_brute_force_on_sequences():
    model, examples, names, loader = gpt2_equal_length_setup()
    stats = collect(model, loader, names, ["output_gradient_second_moment"], show_progress=False)
    expected = {name: 0.0 for name in names}
    outputs = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: outputs.update({name: o}))
        for name in names
    ]
    singles = list(build_calibration_loader(examples, model=model, batch_size=1))
    for batch in singles:
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, [outputs[name] for name in names])
        for name, grad in zip(names, grads, strict=True):
            rows = grad.reshape(-1, grad.shape[-1])
            expected[name] = expected[name] + rows.T @ rows
    for handle in handles:
        handle.remove()
    for name in names:
        out_features = model.get_submodule(name).weight.shape[1]  # GPT-2 Conv1D: in x out
        assert stats["output_gradient_second_moment"][name].shape == (out_features, out_features)
        assert torch.allclose(
            stats["output_gradient_second_moment"][name], expected[name] / len(singles), rtol=1e-4, atol=1e-12
        )


def test_method_factorises_two_sided_and_allocates_like_fisher_whiten():
    method = get_method("kfac_whiten")
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    stats = {
        "gradient_second_moment": {"m": random_moment(5, 60, 10)},
        "output_gradient_second_moment": {"m": random_moment(6, 60, 11)},
    }

    class Config:
        importance_floor, svd_solver = 0.0, "full"

    expected = kronecker_factorize(
        weight, 2, stats["gradient_second_moment"]["m"], stats["output_gradient_second_moment"]["m"]
    )
    assert torch.equal(method.factorize(weight, 2, "m", stats, Config()).product(), expected.product())
    one_sided = get_method("fisher_whiten").weighted_matrix("m", weight, stats, Config())
    assert torch.equal(method.weighted_matrix("m", weight, stats, Config()), one_sided)
    assert method.statistics == ("gradient_second_moment", "output_gradient_second_moment")
