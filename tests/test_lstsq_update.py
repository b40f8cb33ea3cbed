"""SVD-LLM's least-squares update of the `up` factor (`hf_fwsvd.lstsq_update`)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import calibration_data, compressed_with_loader, tiny_gpt2, tiny_llama

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.factorize import factorize
from hf_fwsvd.layers import LowRankLinear, dense_weight
from hf_fwsvd.lstsq_update import DENSE_TARGET_WARNING, output_error, sequential_update, update_up_factor
from hf_fwsvd.progress import progress_bars, progress_enabled
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
    dense, model, targets, loader = compressed_with_loader(build, "svd")
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


@pytest.mark.parametrize("seed", range(4))
def test_output_error_against_other_targets_matches_brute_force(seed):
    weight, _ = _problem(seed)
    generator = torch.Generator().manual_seed(seed + 50)
    dense_inputs = torch.randn(40, weight.shape[1], generator=generator, dtype=torch.float64)
    inputs = dense_inputs + 0.3 * torch.randn(dense_inputs.shape, generator=generator, dtype=torch.float64)
    up = torch.randn(weight.shape[0], 3, generator=generator, dtype=torch.float64)
    down = torch.randn(3, weight.shape[1], generator=generator, dtype=torch.float64)
    expected = (dense_inputs @ weight.T - inputs @ (up @ down).T).norm() / (dense_inputs @ weight.T).norm()
    got = output_error(weight, up, down, inputs.T @ inputs, dense_inputs.T @ inputs, dense_inputs.T @ dense_inputs)
    assert got == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_dense_target_update_is_the_least_squares_optimum_and_beats_svdllms(seed):
    weight, _ = _problem(seed)
    generator = torch.Generator().manual_seed(seed + 50)
    dense_inputs = torch.randn(40, weight.shape[1], generator=generator, dtype=torch.float64)
    inputs = dense_inputs + 0.3 * torch.randn(dense_inputs.shape, generator=generator, dtype=torch.float64)
    moments = (inputs.T @ inputs, dense_inputs.T @ inputs, dense_inputs.T @ dense_inputs)
    down = factorize(weight.float(), 4, moments[2].float()).down.double()
    up = update_up_factor(weight, down, moments[0], moments[1]).double()
    # brute force: the gradient of ||X_d W^T - X_c B^T A^T||^2 in A vanishes at the optimum
    gradient = (dense_inputs @ weight.T - inputs @ down.T @ up.T).T @ (inputs @ down.T)
    assert gradient.abs().max() < 1e-4 * (weight @ moments[1] @ down.T).abs().max()
    svdllm = update_up_factor(weight, down, moments[0])  # fits the dense module on the compressed inputs instead
    assert output_error(weight, up, down, *moments) < output_error(weight, svdllm, down, *moments)


@pytest.mark.parametrize("seed", range(4))
def test_refitting_both_factors_is_at_least_as_good_as_refitting_up(seed):
    weight, moment = _problem(seed)
    _, other = _problem(seed + 100)
    down = factorize(weight.float(), 4, other.float()).down
    up_only = output_error(weight, update_up_factor(weight, down, moment), down, moment)
    both = factorize(weight.float(), 4, moment.float())
    assert output_error(weight, both.up, both.down, moment) <= up_only + 1e-7


@pytest.mark.parametrize(("refit", "target"), [("up", "dense"), ("both", "compressed")])
def test_sequential_update_variants_never_raise_a_modules_error(refit, target):
    _, model, targets, loader = compressed_with_loader(tiny_llama, "whiten")
    report = sequential_update(model, dict(targets), loader, refit=refit, target=target)
    assert set(report.errors) == set(targets)
    for name, (error_before, error_after) in report.errors.items():
        assert error_after <= error_before, name
    assert sum(after for _, after in report.errors.values()) < sum(b for b, _ in report.errors.values())


def test_dense_target_first_block_equals_svdllm_and_later_blocks_fit_the_dense_model():
    """Block 0 sees the dense model's inputs (X_d = X_c): both targets give the same factors there."""
    _, compressed, targets, loader = compressed_with_loader(tiny_llama, "svd")
    results = {}
    for target in ("compressed", "dense"):
        model = copy.deepcopy(compressed)
        results[target] = (model, sequential_update(model, dict(targets), loader, target=target))
    first = [name for name in targets if ".layers.0." in name]
    later = [name for name in targets if ".layers.0." not in name]
    assert first and later
    for name in first:
        torch.testing.assert_close(results["dense"][0].get_submodule(name).up.weight,
                                   results["compressed"][0].get_submodule(name).up.weight)  # fmt: skip
        assert results["dense"][1].errors[name] == pytest.approx(results["compressed"][1].errors[name], rel=1e-6)
    assert any(results["dense"][1].errors[n] != pytest.approx(results["compressed"][1].errors[n]) for n in later)


@pytest.mark.parametrize("target", ["compressed", "dense"])
def test_only_the_dense_target_warns(target, caplog):
    _, model, targets, loader = compressed_with_loader(tiny_llama, "whiten")
    with caplog.at_level(logging.WARNING, logger="hf_fwsvd.lstsq_update"):
        sequential_update(model, dict(targets), loader, target=target)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ([DENSE_TARGET_WARNING] if target == "dense" else [])
    assert "1359.6" in DENSE_TARGET_WARNING


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"refit": "all"}, "Unknown refit 'all'; choose one of 'up', 'both'."),
        ({"target": "model"}, "Unknown target 'model'; choose one of 'compressed', 'dense'."),
        ({"refit": "both", "target": "dense"},
         "refit='both' fits the compressed model's own outputs only; use target='compressed'."),
    ],
)  # fmt: skip
def test_sequential_update_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError) as error:
        sequential_update(tiny_llama(), {}, [], **kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("updated", "truncation"), [("fisher_svdllm", "fisher_whiten"), ("kfac_svdllm", "kfac_whiten")]
)
def test_update_methods_keep_their_truncations_down_factors_and_never_raise_the_output_error(
    monkeypatch, updated, truncation
):
    from hf_fwsvd.methods import svdllm as svdllm_module

    reports = []

    def recording_update(*args, **kwargs):
        reports.append(sequential_update(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(svdllm_module, "sequential_update", recording_update)
    torch.manual_seed(0)
    dense = tiny_llama()
    data = calibration_data("llama", 12)
    models = {}
    for method in (updated, truncation):
        config = FWSVDConfig(method=method, rank=2, calibration_dataset=data, batch_size=4)
        models[method] = compress(copy.deepcopy(dense), config, show_progress=False)
    (report,) = reports  # only the update method runs it
    low_rank = {n: m for n, m in models[updated].named_modules() if isinstance(m, LowRankLinear)}
    assert set(report.errors) == set(low_rank)
    for name, module in low_rank.items():
        plain = models[truncation].get_submodule(name)
        assert torch.equal(module.down.weight, plain.down.weight), name  # the truncation's `down` is kept
        error_before, error_after = report.errors[name]
        assert error_after <= error_before, name  # the calibration reconstruction error never rises
    assert sum(after for _, after in report.errors.values()) < sum(b for b, _ in report.errors.values())
    changed = [
        n for n, m in low_rank.items() if not torch.equal(m.up.weight, models[truncation].get_submodule(n).up.weight)
    ]
    assert len(changed) >= len(low_rank) - len(report.rejected)


def _dense_inputs(dense, names: list[str], loader) -> dict[str, list[torch.Tensor]]:
    """The inputs of each module of `names` in the dense model, one ``batch x tokens x in`` tensor per batch."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(dense.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, args, o, name=name: inputs[name].append(args[0].detach()))
        for name in names
    ]
    with torch.no_grad():
        for batch in loader:
            dense(**{k: v for k, v in batch.items() if k != "labels"})
    for handle in handles:
        handle.remove()
    return inputs


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_intercept_update_fits_up_and_bias_by_least_squares(build):
    """In the first block every module sees the dense model's inputs, so brute force: ``[A, b]`` is the least-squares
    solution of ``[X B^T, 1] [A, b]^T = X W^T + b_0`` (gpt2 has biases to refit, llama gains them)."""
    dense, model, targets, loader = compressed_with_loader(build, "svd")
    first_block = [name for name in targets if ".0." in name]
    downs = {name: model.get_submodule(name).down.weight.detach().double().clone() for name in first_block}
    inputs = {
        name: [batch.reshape(-1, batch.shape[-1]) for batch in batches]
        for name, batches in _dense_inputs(dense, first_block, loader).items()
    }
    report = sequential_update(model, dict(targets), loader, intercept=True)
    assert not report.rejected
    for name in first_block:
        rows = torch.cat(inputs[name]).double()
        weight = dense_weight(targets[name]).double()
        bias = getattr(targets[name], "bias", None)
        outputs = rows @ weight.T + (0 if bias is None else bias.detach().double())
        design = torch.cat([rows @ downs[name].T, torch.ones(rows.shape[0], 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, outputs).solution.T  # out x (rank + 1)
        module = model.get_submodule(name)
        assert torch.equal(module.down.weight.double(), downs[name])
        torch.testing.assert_close(module.up.weight.double(), solution[:, :-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(module.up.bias.double(), solution[:, -1], atol=1e-4, rtol=1e-4)


def _first_token_excluded(loader) -> list[torch.Tensor]:
    weights = []
    for batch in loader:
        one_batch = torch.ones(batch["input_ids"].shape)
        one_batch[:, 0] = 0.0
        weights.append(one_batch)
    return weights


@pytest.mark.parametrize("target", ["compressed", "dense"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_bias_on_weighted_tokens_keeps_the_plain_update_and_removes_their_mean_error(build, target):
    """With `bias_token_weights`, `A` is the plain update's and, brute force in the first block (dense and compressed
    inputs agree there), the bias is the mean output error of the tokens of weight 1 (each passage but its first)."""
    dense, model, targets, loader = compressed_with_loader(build, "svd")
    first_block = [name for name in targets if ".0." in name]
    inputs = _dense_inputs(dense, first_block, loader)
    plain = copy.deepcopy(model)
    plain_report = sequential_update(plain, dict(targets), loader, target=target)
    weights = {name: _first_token_excluded(loader) for name in targets}
    report = sequential_update(model, dict(targets), loader, intercept=True, bias_token_weights=weights, target=target)
    assert set(report.errors) == set(plain_report.errors)
    for name in first_block:
        module, reference = model.get_submodule(name), plain.get_submodule(name)
        assert report.errors[name] == plain_report.errors[name]  # the A step is the plain update's
        assert torch.equal(module.up.weight, reference.up.weight), name
        rows = torch.cat([batch.flatten(0, 1) for batch in inputs[name]]).double()
        kept = torch.cat([torch.ones(batch.shape[:2]).index_fill(1, torch.tensor([0]), 0) for batch in inputs[name]])
        bias = getattr(targets[name], "bias", None)
        outputs = rows @ dense_weight(targets[name]).double().T + (0 if bias is None else bias.detach().double())
        errors = outputs - rows @ module.down.weight.double().T @ module.up.weight.double().T
        expected = errors[kept.flatten() > 0].mean(0)
        torch.testing.assert_close(module.up.bias.double(), expected, atol=1e-6, rtol=1e-4)
        assert not torch.allclose(expected, errors.mean(0), atol=1e-6, rtol=1e-4)  # the first tokens are left out


def test_bias_token_weights_need_the_intercept():
    dense, model, targets, loader = compressed_with_loader(tiny_llama, "svd")
    weights = {name: _first_token_excluded(loader) for name in targets}
    with pytest.raises(ValueError) as error:
        sequential_update(model, dict(targets), loader, bias_token_weights=weights)
    assert str(error.value) == (
        "`bias_token_weights` choose the tokens a bias is fitted on; pass intercept=True with them."
    )


def test_bias_token_weights_of_zero_everywhere_are_refused():
    dense, model, targets, loader = compressed_with_loader(tiny_llama, "svd")
    zeros = [torch.zeros(batch["input_ids"].shape) for batch in loader]
    first = next(iter(targets))
    with pytest.raises(ValueError) as error:
        sequential_update(
            model, dict(targets), loader, intercept=True, bias_token_weights=dict.fromkeys(targets, zeros)
        )
    assert str(error.value) == (
        f"`bias_token_weights` give `{first}` no weight on any calibration token, so its bias is undefined; give "
        "some tokens a positive weight."
    )


@pytest.mark.parametrize("target", ["compressed", "dense"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_intercept_update_never_raises_an_error_and_fits_better_than_up_alone(build, target):
    dense, model, targets, loader = compressed_with_loader(build, "svd")
    plain, with_bias = copy.deepcopy(model), copy.deepcopy(model)
    plain_report = sequential_update(plain, dict(targets), loader, target=target)
    report = sequential_update(with_bias, dict(targets), loader, intercept=True, target=target)
    for name, (before, after) in report.errors.items():
        assert after <= before, name
    assert sum(after for _, after in report.errors.values()) < sum(a for _, a in plain_report.errors.values())
    assert all(with_bias.get_submodule(name).up.bias is not None for name in targets)


def test_intercept_update_needs_the_up_refit():
    with pytest.raises(ValueError) as error:
        sequential_update(tiny_llama(), {}, [], refit="both", intercept=True)
    assert str(error.value) == "intercept=True fits the `up` factor and its bias; use refit='up'."


def test_a_model_with_a_bias_its_architecture_lacks_is_not_saved(tmp_path):
    dense, model, targets, loader = compressed_with_loader(tiny_llama, "svd")
    sequential_update(model, dict(targets), loader, intercept=True)
    with pytest.raises(ValueError) as error:
        model.save_pretrained(tmp_path / "saved")
    assert str(error.value) == (
        "Cannot save: `model.layers.0.self_attn.q_proj`, `model.layers.0.self_attn.k_proj`, "
        "`model.layers.0.self_attn.v_proj` (and 11 more) carry a bias fitted by `sequential_update(intercept=True)` "
        "that LlamaForCausalLM has no place for, so the checkpoint could not load it. Run the update without "
        "`intercept` to save the model."
    )
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("show_progress", [True, False])
def test_the_update_shows_a_progress_bar_over_blocks_unless_compress_hides_bars(capsys, show_progress):
    config = FWSVDConfig(method="svdllm", rank=2, calibration_dataset=calibration_data("llama", 4), batch_size=4)
    model = compress(tiny_llama(), config, show_progress=show_progress)
    blocks = len(model.model.layers)
    bars = capsys.readouterr().err
    assert ("Least-squares update: 100%" in bars and f"{blocks}/{blocks}" in bars) is show_progress
    assert ("Factorising" in bars) is show_progress  # the same switch as the pipeline's own bars
    assert progress_enabled()  # restored after compress


def test_a_direct_call_follows_its_own_show_progress(capsys):
    _, model, targets, loader = compressed_with_loader(tiny_llama, "svd")
    with progress_bars(False):
        sequential_update(model, targets, loader, show_progress=True)
    assert "Least-squares update: 100%" in capsys.readouterr().err
    sequential_update(model, targets, loader, show_progress=False)
    assert "Least-squares update" not in capsys.readouterr().err
