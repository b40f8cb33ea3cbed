"""`method=None` resolves per model at compress time (`hf_fwsvd.defaults`); explicit choices stay untouched."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import calibration_data, tiny_bert, tiny_llama

import hf_fwsvd.defaults as defaults
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.calibration import calibration_token_count
from hf_fwsvd.defaults import UNIFORM_CAUSAL_WARNING, resolve_defaults


def test_causal_lm_without_method_or_size_gets_kfac_svdllm_with_the_allocation():
    config = resolve_defaults(tiny_llama(), FWSVDConfig().copy_for_run())
    assert (config.method, config.rank_ratio, config.param_budget) == ("kfac_svdllm", None, 0.8)
    assert (config.allocation, config.allocation_power, config.sink_threshold) == ("fisher", 1.0, None)
    assert config.first_token_weight == 0.1


def test_the_causal_default_keeps_an_explicit_first_token_weight():
    config = resolve_defaults(tiny_llama(), FWSVDConfig(first_token_weight=1.0).copy_for_run())
    assert (config.method, config.first_token_weight) == ("kfac_svdllm", 1.0)
    explicit = FWSVDConfig(method="kfac_svdllm", param_budget=0.7).copy_for_run()
    assert resolve_defaults(tiny_llama(), explicit).first_token_weight is None  # an explicit method: as collected
    assert resolve_defaults(tiny_bert(), FWSVDConfig().copy_for_run()).first_token_weight is None


def test_causal_lm_without_method_keeps_an_explicit_size():
    config = resolve_defaults(tiny_llama(), FWSVDConfig(param_ratio=0.6).copy_for_run())
    assert (config.method, config.param_ratio, config.param_budget) == ("kfac_svdllm", 0.6, None)
    config = resolve_defaults(tiny_llama(), FWSVDConfig(param_budget=0.7).copy_for_run())
    assert (config.method, config.param_budget, config.allocation_power) == ("kfac_svdllm", 0.7, 1.0)
    assert config.sink_threshold is None  # not part of the default (it lost at 60% kept, benchmarks/README.md)
    config = resolve_defaults(tiny_llama(), FWSVDConfig(param_budget=0.7, sink_threshold=20.0).copy_for_run())
    assert config.sink_threshold == 20.0  # an explicit threshold is kept


def test_other_models_without_method_get_the_papers_fwsvd():
    config = resolve_defaults(tiny_bert(), FWSVDConfig().copy_for_run())
    assert (config.method, config.rank_ratio, config.param_budget) == ("fwsvd", 0.33, None)
    assert resolve_defaults(tiny_bert(), FWSVDConfig(param_budget=0.5).copy_for_run()).sink_threshold is None


def test_an_explicit_method_gets_no_sink_threshold():
    config = resolve_defaults(tiny_llama(), FWSVDConfig(method="kfac_svdllm", param_budget=0.7).copy_for_run())
    assert config.sink_threshold is None


@pytest.mark.parametrize("method", ["fwsvd", "svd"])
def test_uniform_fwsvd_or_svd_on_a_causal_lm_warns_and_is_kept(method, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_fwsvd.defaults"):
        config = resolve_defaults(tiny_llama(), FWSVDConfig(method=method, param_ratio=0.8).copy_for_run())
    assert config.method == method and config.param_ratio == 0.8
    assert [record.getMessage() for record in caplog.records] == [UNIFORM_CAUSAL_WARNING.format(method=method)]
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(
            f"method='{method}' with the same rank rule in every module destroys causal LMs (measured on SmolLM2-135M"
        )
    )


def test_explicit_whiten_and_classifiers_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_fwsvd.defaults"):
        resolve_defaults(tiny_llama(), FWSVDConfig(method="whiten", param_ratio=0.8).copy_for_run())
        resolve_defaults(tiny_bert(), FWSVDConfig(method="svd", param_ratio=0.8).copy_for_run())
    assert caplog.records == []


def test_compress_saves_the_resolved_default(tmp_path):
    model = tiny_llama()
    config = FWSVDConfig(calibration_dataset=calibration_data("llama", 8), batch_size=4)
    compress(model, config, show_progress=False)
    saved = model.config.quantization_config
    assert (saved.method, saved.param_budget, saved.allocation_power) == ("kfac_svdllm", 0.8, 1.0)
    assert saved.sink_threshold is None
    assert config.method is None and config.rank_ratio == 0.33  # the user's config is not modified
    model.save_pretrained(tmp_path / "out")
    reloaded = type(model).from_pretrained(tmp_path / "out")
    assert reloaded.config.quantization_config.method == "kfac_svdllm"


def _assert_equals_explicit(model, reference, data, method: str) -> None:
    """`model`, compressed by the causal-LM default on `data`, equals `reference` compressed with that default written
    out (`method`, 80% kept, power 0.75, first-token weight 0.1)."""
    explicit = FWSVDConfig(method=method, param_budget=0.8, allocation_power=0.75, first_token_weight=0.1,
                           calibration_dataset=data, batch_size=4)  # fmt: skip
    compress(reference, explicit, show_progress=False)
    assert model.config.quantization_config.ranks == reference.config.quantization_config.ranks
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())  # that config exactly


def test_a_large_calibration_set_drops_the_update_from_the_causal_default(monkeypatch, caplog):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    data = calibration_data("llama", 8)
    config = FWSVDConfig(calibration_dataset=data, batch_size=4)
    tokens = calibration_token_count(config, model)
    assert tokens == sum(len(example["input_ids"]) for example in data) == 45  # padding not counted
    monkeypatch.setattr(defaults, "LARGE_CALIBRATION_TOKENS", tokens)
    monkeypatch.setattr(defaults, "ALLOCATION_POWER_TOKENS", tokens)
    with caplog.at_level(logging.INFO, logger="hf_fwsvd.defaults"):
        compress(model, config, show_progress=False)
    assert model.fwsvd_report.method == "kfac_whiten"
    saved = model.config.quantization_config
    assert (saved.method, saved.param_budget, saved.allocation_power) == ("kfac_whiten", 0.8, 0.75)
    assert caplog.records[-1].getMessage() == (
        f"{tokens} calibration tokens: using method='kfac_whiten' (without SVD-LLM's update; from {tokens} tokens) "
        f"and allocation_power=0.75 (from {tokens} tokens), which won with large calibration sets."
    )
    _assert_equals_explicit(model, reference, data, "kfac_whiten")


def test_a_mid_sized_calibration_set_tempers_the_allocation_and_keeps_the_update(monkeypatch, caplog):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    data = calibration_data("llama", 8)
    monkeypatch.setattr(defaults, "LARGE_CALIBRATION_TOKENS", 46)
    monkeypatch.setattr(defaults, "ALLOCATION_POWER_TOKENS", 45)
    with caplog.at_level(logging.INFO, logger="hf_fwsvd.defaults"):
        compress(model, FWSVDConfig(calibration_dataset=data, batch_size=4), show_progress=False)
    saved = model.config.quantization_config
    assert (saved.method, saved.param_budget, saved.allocation_power) == ("kfac_svdllm", 0.8, 0.75)
    messages = [record.getMessage() for record in caplog.records if record.name == "hf_fwsvd.defaults"]
    assert messages[-1] == (
        "45 calibration tokens: using allocation_power=0.75 (from 45 tokens), which won with large calibration sets."
    )
    _assert_equals_explicit(model, reference, data, "kfac_svdllm")


def test_the_default_thresholds_are_the_measured_ones():
    assert (defaults.ALLOCATION_POWER_TOKENS, defaults.LARGE_CALIBRATION_TOKENS) == (131_072, 131_072)
    assert (defaults.CAUSAL_LM_ALLOCATION_POWER, defaults.LARGE_CALIBRATION_ALLOCATION_POWER) == (1.0, 0.75)
    assert defaults.CAUSAL_LM_FIRST_TOKEN_WEIGHT == 0.1


def test_a_large_calibration_set_with_an_explicit_rank_keeps_it(monkeypatch, caplog):
    model = tiny_llama()
    config = FWSVDConfig(calibration_dataset=calibration_data("llama", 8), batch_size=4, rank=2)
    monkeypatch.setattr(defaults, "LARGE_CALIBRATION_TOKENS", 1)
    monkeypatch.setattr(defaults, "ALLOCATION_POWER_TOKENS", 1)
    with caplog.at_level(logging.INFO, logger="hf_fwsvd.defaults"):
        compress(model, config, show_progress=False)
    assert model.config.quantization_config.method == "kfac_whiten"
    assert set(model.config.quantization_config.ranks.values()) == {2}
    assert caplog.records[-1].getMessage() == (
        "45 calibration tokens: using method='kfac_whiten' (without SVD-LLM's update; from 1 tokens), which won with "
        "large calibration sets."
    )


def test_the_update_and_power_stay_below_the_thresholds_and_for_an_explicit_method(monkeypatch, caplog):
    data = calibration_data("llama", 8)
    tokens = calibration_token_count(FWSVDConfig(calibration_dataset=data, batch_size=4), tiny_llama())
    monkeypatch.setattr(defaults, "LARGE_CALIBRATION_TOKENS", tokens + 1)
    monkeypatch.setattr(defaults, "ALLOCATION_POWER_TOKENS", tokens + 1)
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="hf_fwsvd.defaults"):
        compress(model, FWSVDConfig(calibration_dataset=data, batch_size=4), show_progress=False)
    saved = model.config.quantization_config
    assert (saved.method, saved.allocation_power) == ("kfac_svdllm", 1.0)
    assert not any("calibration tokens" in record.getMessage() for record in caplog.records)
    monkeypatch.setattr(defaults, "LARGE_CALIBRATION_TOKENS", 1)
    monkeypatch.setattr(defaults, "ALLOCATION_POWER_TOKENS", 1)
    model = tiny_llama()
    explicit = FWSVDConfig(method="kfac_svdllm", param_budget=0.8, calibration_dataset=data, batch_size=4)
    compress(model, explicit, show_progress=False)
    saved = model.config.quantization_config
    assert (saved.method, saved.allocation_power) == ("kfac_svdllm", 0.5)


def test_block_by_block_causal_default_is_kfac_whiten():
    config = resolve_defaults(type(tiny_llama()), FWSVDConfig().copy_for_run(), in_memory=False)
    assert (config.method, config.param_budget, config.allocation_power) == ("kfac_whiten", 0.8, 1.0)
    assert (config.sink_threshold, config.first_token_weight) == (None, 0.1)


@pytest.mark.parametrize("large", [False, True], ids=["8 examples", "large calibration"])
def test_an_explicit_allocation_power_is_kept_by_the_causal_default(monkeypatch, caplog, large):
    if large:
        monkeypatch.setattr(defaults, "LARGE_CALIBRATION_TOKENS", 1)
        monkeypatch.setattr(defaults, "ALLOCATION_POWER_TOKENS", 1)
    model = tiny_llama()
    config = FWSVDConfig(allocation_power=0.9, calibration_dataset=calibration_data("llama", 8), batch_size=4)
    with caplog.at_level(logging.INFO, logger="hf_fwsvd.defaults"):
        compress(model, config, show_progress=False)
    saved = model.config.quantization_config
    expected = "kfac_whiten" if large else "kfac_svdllm"
    assert (saved.method, saved.param_budget, saved.allocation_power) == (expected, 0.8, 0.9)
    assert caplog.records[0].getMessage() == (
        "No method given for a causal LM: using method='kfac_svdllm' with param_budget=0.8, allocation_power=0.9 "
        "and first_token_weight=0.1 (the best measured setting)."
    )
    if large:
        assert (
            caplog.records[-1]
            .getMessage()
            .endswith(
                "using method='kfac_whiten' (without SVD-LLM's update; from 1 tokens), which won with large "
                "calibration sets."
            )
        )


def test_the_allocation_power_default_is_not_a_given_value():
    assert FWSVDConfig().allocation_power == 0.5 and FWSVDConfig().allocation_power_defaulted
    assert not FWSVDConfig(allocation_power=0.5).allocation_power_defaulted
    reloaded = FWSVDConfig.from_dict(FWSVDConfig(param_budget=0.8).to_dict())
    assert reloaded.allocation_power == 0.5 and not reloaded.allocation_power_defaulted  # as saved, explicit
