"""SVD-LLM's least-squares update of the `up` factor (`hf_fwsvd.lstsq_update`)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.factorize import factorize
from hf_fwsvd.layers import LowRankLinear, dense_weight
from hf_fwsvd.lstsq_update import output_error, sequential_update, update_up_factor
from hf_fwsvd.targets import find_target_modules


def _problem(seed: int, out_features: int = 12, in_features: int = 10, tokens: int = 40):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    mixing = torch.randn(in_features, in_features, generator=generator, dtype=torch.float64)
    inputs = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) @ mixing
    return weight, inputs.T @ inputs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["svd", "whiten_other_inputs"])
def test_update_never_raises_the_output_error(seed, method):
    weight, moment = _problem(seed)
    _, other = _problem(seed + 100)
    importance = None if method == "svd" else other  # truncation weighted by different inputs than the update's
    factors = factorize(weight.float(), 4, importance if importance is None else importance.float())
    before = output_error(weight, factors.up, factors.down, moment)
    up = update_up_factor(weight, factors.down, moment)
    after = output_error(weight, up, factors.down, moment)
    assert after <= before + 1e-7
    assert after < 0.999 * before  # the truncation was not fitted to these inputs: the update really helps


@pytest.mark.parametrize("seed", range(4))
def test_update_is_the_least_squares_optimum(seed):
    weight, moment = _problem(seed)
    down = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    up = update_up_factor(weight, down, moment).double()
    # brute force: the gradient of tr((W - A B) C (W - A B)^T) in A vanishes at the optimum
    gradient = (weight - up @ down) @ moment @ down.T
    assert gradient.abs().max() < 1e-4 * (weight @ moment @ down.T).abs().max()


def test_update_is_a_no_op_on_the_whitening_statistics():
    """With the same inputs that whitened the truncation, SVD-LLM's update leaves `up` unchanged (A* = U_r)."""
    weight, moment = _problem(3)
    factors = factorize(weight.float(), 4, moment.float())
    up = update_up_factor(weight, factors.down, moment)
    torch.testing.assert_close(up, factors.up, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("as_weights", [False, True], ids=["modules", "weights"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_sequential_update_lowers_every_modules_error(build, as_weights):
    torch.manual_seed(0)
    dense = build()
    data = [{"input_ids": torch.randint(3, 64, (16,)).tolist()} for _ in range(8)]
    config = FWSVDConfig(method="svd", rank=2)
    model = copy.deepcopy(dense)
    compress(model, config, show_progress=False)
    targets = find_target_modules(dense, config)
    loader = build_calibration_loader(data, None, dense, batch_size=4, max_length=16, num_samples=None)
    before = {name: module.up.weight.detach().clone() for name, module in model.named_modules()
              if isinstance(module, LowRankLinear)}  # fmt: skip
    dense_modules = {name: dense_weight(module) for name, module in targets.items()} if as_weights else targets
    report = sequential_update(model, dense_modules, loader)
    assert set(report.errors) == set(targets)
    for name, (error_before, error_after) in report.errors.items():
        assert error_after <= error_before, name
    changed = [name for name in before if not torch.equal(before[name], model.get_submodule(name).up.weight)]
    assert len(changed) >= len(targets) - len(report.rejected)
    assert sum(after for _, after in report.errors.values()) < sum(b for b, _ in report.errors.values())
    for name, module in targets.items():  # the dense modules were only borrowed
        assert isinstance(model.get_submodule(name), LowRankLinear)
        assert torch.equal(module.weight, dict(dense.named_modules())[name].weight)


def test_sequential_update_rejects_a_dense_name():
    model = tiny_llama()
    targets = find_target_modules(model, FWSVDConfig(method="svd", rank=2))
    name = next(iter(targets))
    with pytest.raises(ValueError) as error:
        sequential_update(model, {name: targets[name]}, [])
    assert str(error.value) == f"`{name}` is not a LowRankLinear in the model; compress it before the update."
