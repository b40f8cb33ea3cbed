"""Compress on load -> save -> reload, across architectures and dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHITECTURES, calibration_data
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_fwsvd
from hf_fwsvd import FWSVDConfig, LowRankLinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AUTO = {"gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM}


@pytest.mark.parametrize("dtype_name", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES), ids=list(ARCHITECTURES))
def test_compress_on_load_save_reload(arch, dtype_name, saved_dense, tmp_path, sample_input):
    dense_dir, _ = saved_dense(arch)
    auto = AUTO.get(arch, AutoModelForSequenceClassification)
    dtype = DTYPES[dtype_name]
    config = FWSVDConfig(rank_ratio=0.25, calibration_dataset=calibration_data(arch), batch_size=4)
    compressed = auto.from_pretrained(dense_dir, fwsvd_config=config, dtype=dtype)

    low_rank = {name: m for name, m in compressed.named_modules() if isinstance(m, LowRankLinear)}
    assert low_rank, "nothing was compressed"
    assert config.ranks is None, "the caller's config must not be mutated"
    assert all(m.up.weight.dtype == dtype for m in low_rank.values())

    out_dir = tmp_path / "compressed"
    compressed.save_pretrained(out_dir)
    saved_config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert saved_config["quant_method"] == "fwsvd"
    assert saved_config["ranks"] == {name: m.rank for name, m in low_rank.items()}
    assert saved_config["hf_fwsvd_version"] == hf_fwsvd.__version__
    assert "calibration_dataset" not in saved_config

    with safe_open(out_dir / "model.fwsvd.safetensors", "pt") as handle:
        keys = set(handle.keys())
    for name in low_rank:
        assert f"{name}.weight" not in keys, f"dense weight of {name} was saved"
        assert {f"{name}.down.weight", f"{name}.up.weight"} <= keys
    assert not (out_dir / "model.safetensors").exists()

    reloaded, info = auto.from_pretrained(out_dir, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert {n for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)} == set(low_rank)
    with torch.no_grad():
        expected = compressed(**sample_input).logits
        actual = reloaded(**sample_input).logits
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("arch", list(ARCHITECTURES), ids=list(ARCHITECTURES))
def test_compress_api_matches_compress_on_load(arch, saved_dense, sample_input):
    dense_dir, _ = saved_dense(arch)
    auto = AUTO.get(arch, AutoModelForSequenceClassification)
    config = FWSVDConfig(rank=3, calibration_dataset=calibration_data(arch), batch_size=4)
    on_load = auto.from_pretrained(dense_dir, quantization_config=config)
    by_api = hf_fwsvd.compress(auto.from_pretrained(dense_dir), config, show_progress=False)
    with torch.no_grad():
        assert torch.allclose(on_load(**sample_input).logits, by_api(**sample_input).logits, atol=1e-6)


def test_reload_never_materialises_dense_weights(saved_dense, tmp_path, monkeypatch):
    dense_dir, _ = saved_dense("bert")
    config = FWSVDConfig(rank=4, calibration_dataset=calibration_data("bert"))
    AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config=config).save_pretrained(tmp_path / "c")

    created = []
    original_init = torch.nn.Linear.__init__

    def spy(self, in_features, out_features, *args, **kwargs):
        original_init(self, in_features, out_features, *args, **kwargs)
        created.append(self.weight.device.type)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "c")
    # transformers builds the skeleton on meta; nothing dense may be allocated on CPU for compressed layers
    assert created and set(created) == {"meta"}


def test_dense_export_loads_without_plugin(saved_dense, tmp_path, sample_input):
    dense_dir, _ = saved_dense("gpt2")
    config = FWSVDConfig(rank=4, calibration_dataset=calibration_data("gpt2"))
    compressed = AutoModelForCausalLM.from_pretrained(dense_dir, fwsvd_config=config)
    with torch.no_grad():
        expected = compressed(**sample_input).logits
    compressed.save_pretrained(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    model.dequantize()
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert (tmp_path / "dense" / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with torch.no_grad():
        assert torch.allclose(again(**sample_input).logits, expected, atol=1e-5)
