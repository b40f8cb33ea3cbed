"""SVD-LLM V2's two-SVD truncation (`hf_fwsvd.two_svd`, `method="whiten_v2"`) against brute force and `whiten`."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_llama
from transformers import AutoModelForCausalLM

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.factorize import factorize
from hf_fwsvd.two_svd import two_svd_truncation


def output_error(weight: torch.Tensor, approximation: torch.Tensor, inputs: torch.Tensor) -> float:
    """``||(W - W_r) X^T||_F^2 / n`` in float64 for token rows ``X`` (``n x in``)."""
    residual = weight.double() - approximation.double()
    return float((residual @ inputs.double().T).square().sum() / inputs.shape[0])


def optimal_error(weight: torch.Tensor, moment: torch.Tensor, rank: int) -> float:
    """Eckart-Young on ``W C^{1/2}`` (symmetric square root from an fp64 eigendecomposition): the discarded squared
    singular values, the least output error any rank-`rank` matrix can reach on the inputs behind ``C``."""
    values, vectors = torch.linalg.eigh(moment.double())
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    singular = torch.linalg.svdvals(weight.double() @ root)
    return float(singular[rank:].square().sum())


def random_layer(seed: int, tokens: int, out_features: int = 12, in_features: int = 10, dead: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    scales = torch.logspace(-1, 1, in_features)  # features of very different sizes, as LLM activations have
    inputs = torch.randn(tokens, in_features, generator=generator) * scales
    inputs[:, in_features - dead :] = 0  # dead input features
    return weight, inputs, inputs.double().T @ inputs.double() / tokens  # float64: its null space is exact


@pytest.mark.parametrize("rank", [1, 4, 9], ids=lambda r: f"rank{r}")
@pytest.mark.parametrize("seed", [0, 1])
def test_positive_definite_moment_reaches_the_optimum_like_the_cholesky_route(seed, rank):
    weight, inputs, moment = random_layer(seed, tokens=200)
    assert bool(torch.linalg.cholesky_ex(moment.double())[1] == 0)  # positive definite
    v2 = two_svd_truncation(weight, rank, moment).product()
    cholesky = factorize(weight, rank, moment).product()
    best = optimal_error(weight, moment, rank)
    assert output_error(weight, v2, inputs) == pytest.approx(best, rel=1e-5, abs=1e-9)
    assert output_error(weight, cholesky, inputs) == pytest.approx(best, rel=1e-5, abs=1e-9)
    # the same approximation: the two routes differ by float32 rounding of the factors only
    assert (v2 - cholesky).abs().max() <= 1e-5 * weight.abs().max()


@pytest.mark.parametrize("rank", [2, 5], ids=lambda r: f"rank{r}")
def test_rank_deficient_moment_needs_no_damping_and_is_as_good_on_the_calibration_inputs(rank):
    # 6 tokens for 10 features, two of them dead: C has rank 6 and no Cholesky factor
    weight, inputs, moment = random_layer(2, tokens=6, dead=2)
    assert int(torch.linalg.matrix_rank(moment.double())) == 6
    assert int(torch.linalg.cholesky_ex(moment.double())[1]) > 0
    factors = two_svd_truncation(weight, rank, moment)
    assert torch.isfinite(factors.down).all() and torch.isfinite(factors.up).all()
    v2, cholesky = factors.product(), factorize(weight, rank, moment).product()
    best = optimal_error(weight, moment, rank)
    assert output_error(weight, v2, inputs) == pytest.approx(best, rel=1e-5)
    assert output_error(weight, v2, inputs) <= output_error(weight, cholesky, inputs) * (1 + 1e-5)
    # the directions no calibration token reached (here the dead features) are mapped to zero ...
    assert float(v2[:, 8:].abs().max()) == 0.0
    # ... where the Cholesky route keeps W's action on them, so on new inputs it is never worse
    new_inputs = torch.randn(50, 10, generator=torch.Generator().manual_seed(3))
    assert output_error(weight, cholesky, new_inputs) < output_error(weight, v2, new_inputs)


def test_rank_at_least_the_moment_rank_gives_zero_calibration_error():
    weight, inputs, moment = random_layer(4, tokens=6, dead=2)
    v2 = two_svd_truncation(weight, 7, moment).product()
    assert output_error(weight, v2, inputs) <= 1e-9 * output_error(weight, torch.zeros_like(weight), inputs)


def test_slightly_indefinite_moment_runs_without_damping():
    """Rounding can leave a second moment with tiny negative eigenvalues, where a Cholesky factorisation fails."""
    weight, inputs, moment = random_layer(5, tokens=6)
    values, vectors = torch.linalg.eigh(moment.double())
    indefinite = ((vectors * values.clamp_min(-1e-7)) @ vectors.T).float()
    indefinite[0, 0] -= 1e-7
    assert float(torch.linalg.eigvalsh(indefinite.double())[0]) < 0
    assert int(torch.linalg.cholesky_ex(indefinite.double())[1]) > 0
    v2 = two_svd_truncation(weight, 3, indefinite).product()
    assert output_error(weight, v2, inputs) == pytest.approx(optimal_error(weight, moment, 3), rel=1e-4)


def test_bad_inputs_name_the_module():
    weight = torch.randn(4, 3)
    with pytest.raises(ValueError) as error:
        two_svd_truncation(weight, 2, torch.ones(3), name="layer.q")
    assert str(error.value) == (
        "The two-SVD truncation of `layer.q` needs the in x in second moment of its inputs, got a tensor of shape "
        "(3,)."
    )
    with pytest.raises(ValueError) as error:
        two_svd_truncation(weight, 4, torch.eye(3), name="layer.q")
    assert str(error.value) == "Rank 4 for `layer.q` is out of range: a (4, 3) weight allows ranks 1..3."


def test_whiten_v2_compresses_like_its_maths_and_reloads(tmp_path, sample_input):
    data = calibration_data("llama", 16)
    torch.manual_seed(0)
    model = tiny_llama().eval()
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    compress(model, FWSVDConfig(method="whiten_v2", rank=3, calibration_dataset=data), show_progress=False)
    from hf_fwsvd.activations import collect_activation_statistics
    from hf_fwsvd.calibration import build_calibration_loader

    torch.manual_seed(0)
    reference = tiny_llama().eval()
    name = "model.layers.1.mlp.down_proj"
    stats = collect_activation_statistics(
        reference, build_calibration_loader(data, model=reference), [name], show_progress=False
    )
    module = model.get_submodule(name)
    assert isinstance(module, LowRankLinear) and module.rank == 3
    expected = two_svd_truncation(dense[name], 3, stats.second_moment[name])
    torch.testing.assert_close(module.up.weight @ module.down.weight, expected.product(), atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.config.quantization_config.method == "whiten_v2"
    with torch.no_grad():
        assert torch.equal(model(**sample_input).logits, reloaded(**sample_input).logits)
