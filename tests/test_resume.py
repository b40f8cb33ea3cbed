"""Resumable compression: `FWSVDConfig(importances_cache=...)` saves the Fisher before factorising and reuses it."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_bert, tiny_llama
from safetensors.torch import load_file

import hf_fwsvd.api
import hf_fwsvd.methods.calibrate
from hf_fwsvd import FWSVDConfig, compress, compute_importances


def _model():
    torch.manual_seed(0)
    return tiny_llama()


def _config(**kwargs) -> FWSVDConfig:
    # method="fwsvd": the Fisher cache is under test (a causal LM would default to `whiten`)
    return FWSVDConfig(
        method="fwsvd", rank=4, calibration_dataset=calibration_data("llama", count=10), batch_size=4, **kwargs
    )


def test_interrupted_compression_restarts_from_saved_importances(tmp_path, monkeypatch):
    cache = tmp_path / "importances.safetensors"
    reference = compress(_model(), _config(), show_progress=False).state_dict()
    expected_importances = compute_importances(_model(), _config(), show_progress=False)

    original = hf_fwsvd.api.LowRankLinear.from_factors
    calls = []

    def crash_on_third_layer(*args, **kwargs):
        calls.append(kwargs.get("name"))
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption while factorising")
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_fwsvd.api.LowRankLinear, "from_factors", crash_on_third_layer)
    with pytest.raises(KeyboardInterrupt, match="simulated interruption"):
        compress(_model(), _config(importances_cache=str(cache)), show_progress=False)
    assert len(calls) == 3
    saved = load_file(cache)
    assert sorted(saved) == sorted(expected_importances)
    assert all(torch.equal(saved[name], value) for name, value in expected_importances.items())

    monkeypatch.setattr(hf_fwsvd.api.LowRankLinear, "from_factors", original)

    def no_estimation(*args, **kwargs):
        raise AssertionError("the restarted run estimated the Fisher again")

    monkeypatch.setattr(hf_fwsvd.methods.calibrate, "collect", no_estimation)
    resumed = compress(_model(), _config(importances_cache=str(cache)), show_progress=False).state_dict()
    assert sorted(resumed) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_stale_cache_names_the_file(tmp_path):
    cache = tmp_path / "bert.safetensors"
    torch.manual_seed(0)
    compress(
        tiny_bert(), FWSVDConfig(rank=4, calibration_dataset=calibration_data("bert"), importances_cache=str(cache))
    )
    with pytest.raises(
        ValueError, match=r"Importances are missing .* read from `importances_cache` .*bert\.safetensors"
    ):
        compress(_model(), _config(importances_cache=str(cache)), show_progress=False)


def test_cache_config_validation(tmp_path):
    with pytest.raises(ValueError, match="either `importances` .* or `importances_cache`"):
        FWSVDConfig(importances={"a": torch.ones(2)}, importances_cache=str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="directory that does not exist"):
        FWSVDConfig(importances_cache=str(tmp_path / "missing" / "x.safetensors"))
    config = FWSVDConfig(importances_cache=tmp_path / "x.safetensors")
    assert config.importances_cache == str(tmp_path / "x.safetensors")
    assert "importances_cache" not in config.to_dict()


def test_cache_records_its_fisher_estimator_and_refuses_another(tmp_path, caplog):
    from safetensors import safe_open

    cache = tmp_path / "importances.safetensors"
    compress(_model(), _config(importances_cache=str(cache)), show_progress=False)
    with safe_open(str(cache), framework="pt") as handle:
        assert handle.metadata()["fisher_estimator"] == "empirical"
    with pytest.raises(ValueError) as error:
        compress(_model(), _config(importances_cache=str(cache), fisher_estimator="batch"), show_progress=False)
    assert str(error.value) == (
        f"`importances_cache` {str(cache)!r} holds row_fisher estimated with fisher_estimator='empirical', but this "
        "run asks for fisher_estimator='batch': delete the file (or use another path) to re-estimate, or set "
        "fisher_estimator to match it."
    )
    # a cache of an older version records no estimator: reused as 'empirical' with a warning, refused for another
    from hf_fwsvd.statistics.cache import load_statistics_cache, save_statistics_cache

    save_statistics_cache(load_statistics_cache(cache), cache)
    with pytest.raises(ValueError, match=r"record the Fisher estimator of its row_fisher .*=.true. was asked"):
        compress(_model(), _config(importances_cache=str(cache), fisher_estimator="true"), show_progress=False)
    with caplog.at_level("WARNING", logger="hf_fwsvd.methods.calibrate"):
        compress(_model(), _config(importances_cache=str(cache)), show_progress=False)
    assert "does not record its Fisher estimator (written by an older version)" in caplog.text


def test_forward_statistics_added_to_a_cache_keep_its_fisher_estimator(tmp_path):
    from safetensors import safe_open

    cache = tmp_path / "importances.safetensors"
    compress(_model(), _config(importances_cache=str(cache), fisher_estimator="batch"), show_progress=False)
    whiten = FWSVDConfig(
        method="whiten", rank=4, calibration_dataset=calibration_data("llama", count=10), importances_cache=str(cache)
    )
    compress(_model(), whiten, show_progress=False)
    with safe_open(str(cache), framework="pt") as handle:
        assert handle.metadata()["fisher_estimator"] == "batch"  # the row Fisher in it is still the batch one
        assert any(key.startswith("activation_second_moment/") for key in handle.keys())
