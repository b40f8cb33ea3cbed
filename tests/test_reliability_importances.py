"""Reliability: bad importances name the module; a failure mid-factorisation leaves the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert
from reliability_cases import fails_with

import hf_fwsvd.api
from hf_fwsvd import FWSVDConfig, LowRankLinear, compress, save_importances

QUERY = "bert.encoder.layer.0.attention.self.query"
LAST = "bert.encoder.layer.1.output.dense"


def importances(model, **override):
    generator = torch.Generator().manual_seed(0)
    values = {
        name: torch.rand(module.in_features, generator=generator) + 0.1
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layer." in name
    }
    values.update(override)
    return values


def assert_untouched(model, original):
    assert not any(isinstance(module, LowRankLinear) for module in model.modules())
    for (name, value), (_, expected) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, equal_nan=True, msg=name)


CASES = {
    "nan": (
        torch.tensor([float("nan")] * 3 + [1.0] * 13),
        f"Importance for `{QUERY}` has 3 NaN/Inf values. The calibration loss was probably NaN/Inf; check the "
        "calibration data (labels in range, no empty texts) and the model dtype (estimate in float32).",
    ),
    "inf": (
        torch.tensor([float("inf")] + [1.0] * 15),
        f"Importance for `{QUERY}` has 1 NaN/Inf values. The calibration loss was probably NaN/Inf; check the "
        "calibration data (labels in range, no empty texts) and the model dtype (estimate in float32).",
    ),
    "all-zeros": (
        torch.zeros(16),
        f"Importance for `{QUERY}` is all zeros: the task loss has no gradient through this module. Exclude it with "
        "`modules_to_not_convert`, use `method='svd'`, or check that the calibration data reaches it.",
    ),
    "negative": (
        torch.tensor([-1.0] + [1.0] * 15),
        f"Importance for `{QUERY}` has negative values; Fisher importances are sums of squares.",
    ),
    "wrong-length": (
        torch.ones(17),
        f"Importance for `{QUERY}` has shape (17,), expected (16,): one value per input feature. Recompute the Fisher "
        "importances for this model.",
    ),
    "matrix-instead-of-vector": (
        torch.ones(16, 16),
        f"Importance for `{QUERY}` has shape (16, 16), expected (16,): one value per input feature. Recompute the "
        "Fisher importances for this model.",
    ),
}


@pytest.mark.parametrize("value,message", list(CASES.values()), ids=list(CASES))
def test_bad_importance_values(value, message):
    model = tiny_bert()
    original = copy.deepcopy(model)
    with fails_with(ValueError, message, entry="compress (importances=)"):
        compress(model, FWSVDConfig(rank=2, importances=importances(model, **{QUERY: value})), show_progress=False)
    assert_untouched(model, original)


def test_importance_missing_for_a_module():
    model = tiny_bert()
    values = importances(model)
    del values[LAST]
    with fails_with(
        ValueError,
        f"Importances are missing for 1 targeted module(s), e.g. `{LAST}`. They were computed for another model or "
        "other target modules; recompute them or adjust `target_modules`.",
        entry="compress (importances=)",
    ):
        compress(model, FWSVDConfig(rank=2, importances=values), show_progress=False)


def test_importances_file_missing(tmp_path):
    path = tmp_path / "imp.safetensors"
    with fails_with(
        ValueError,
        f"`importances` file {str(path)!r} does not exist.",
        entry="FWSVDConfig",
        replacements={str(tmp_path): "<tmp>"},
    ):
        FWSVDConfig(rank=2, importances=str(path))


def test_importances_file_corrupt(tmp_path):
    model = tiny_bert()
    path = tmp_path / "imp.safetensors"
    save_importances(importances(model), path)
    path.write_bytes(path.read_bytes()[:-8])  # a truncated copy
    with fails_with(
        ValueError,
        f"Importances file {str(path)!r} is not a readable safetensors file: Error while deserializing header: "
        "incomplete metadata, file not fully covered",
        entry="compress (importances=)",
        replacements={str(tmp_path): "<tmp>"},
    ):
        compress(model, FWSVDConfig(rank=2, importances=str(path)), show_progress=False)


def test_nan_weight_in_the_last_module_rolls_back_every_module():
    model = tiny_bert()
    with torch.no_grad():
        model.get_submodule(LAST).weight[3, 3] = float("nan")
    original = copy.deepcopy(model)
    with fails_with(ValueError, f"`{LAST}` weight has NaN/Inf values; refusing to factorise it.", entry="compress"):
        compress(model, FWSVDConfig(rank=2, importances=importances(model)), show_progress=False)
    assert_untouched(model, original)  # the 11 modules factorised before it were put back
    assert not hasattr(model, "hf_quantizer") and getattr(model.config, "quantization_config", None) is None


def test_interrupt_during_factorisation_rolls_back(monkeypatch):
    model = tiny_bert()
    original = copy.deepcopy(model)
    real = hf_fwsvd.api.LowRankLinear.from_factors
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_fwsvd.api.LowRankLinear, "from_factors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress(model, FWSVDConfig(rank=2, method="svd"), show_progress=False)
    assert len(calls) == 5
    assert_untouched(model, original)
