"""`compress_layerwise`: block-by-block compression from disk equals `compress()` + `save_pretrained()`."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from conftest import calibration_data, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_fwsvd.layerwise
from hf_fwsvd import FWSVDConfig, compress, compress_layerwise, compute_importances
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.sinks import first_token_energy_ratios
from hf_fwsvd.statistics import collect
from hf_fwsvd.targets import find_target_modules

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Offload everything but the embeddings: blocks and final norm go to disk, accelerate hooks load them per forward.
GPT2_OFFLOAD_MAP = {
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "lm_head": "cpu",
    "transformer.h": "disk", "transformer.ln_f": "disk",
}  # fmt: skip


def _config(arch: str, **kwargs) -> FWSVDConfig:
    # the paper's method unless a test says otherwise (causal LMs default to `kfac_svdllm` in memory,
    # `kfac_whiten` by block)
    kwargs.setdefault("method", "fwsvd")
    return FWSVDConfig(rank=4, calibration_dataset=calibration_data(arch), batch_size=4, **kwargs)


def _dense(tmp_path, arch: str) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / f"dense-{arch}")
    MODELS[arch]().save_pretrained(path, max_shard_size="20KB")  # a sharded source checkpoint
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    return path


def _tensors(directory: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in glob.glob(os.path.join(directory, "*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _quantization_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
        return json.load(handle)["quantization_config"]


@pytest.fixture
def reference(tmp_path):
    """Factory: (dense dir, in-memory compressed model, its saved dir) for `arch`."""

    def make(arch: str):
        dense = _dense(tmp_path, arch)
        model = AutoModelForCausalLM.from_pretrained(dense)
        compress(model, _config(arch), show_progress=False)
        saved = str(tmp_path / f"reference-{arch}")
        model.save_pretrained(saved)
        return dense, model, saved

    return make


@pytest.mark.parametrize("arch", sorted(MODELS), ids=sorted(MODELS))
def test_layerwise_checkpoint_equals_compress_and_save(tmp_path, reference, arch):
    dense, model, saved = reference(arch)
    out = str(tmp_path / "layerwise")
    report = compress_layerwise(dense, out, _config(arch), show_progress=False)

    expected, tensors = _tensors(saved), _tensors(out)
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[key], value) for key, value in expected.items())
    config, expected_config = _quantization_config(out), _quantization_config(saved)
    assert config.pop("weights_file") == "model.fwsvd.safetensors.index.json"
    expected_config.pop("weights_file")
    assert config == expected_config
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    assert report.to_dict() == model.fwsvd_report.to_dict()
    with open(os.path.join(out, "fwsvd_report.json"), encoding="utf-8") as handle:
        written = json.load(handle)
    with open(os.path.join(saved, "fwsvd_report.json"), encoding="utf-8") as handle:
        expected_report = json.load(handle)
    # the report file `save_pretrained` writes (no weights fingerprint: the reloaded weights become the reference)
    assert written.pop("fingerprint") is None and expected_report.pop("fingerprint")
    assert written == expected_report
    assert written["base_model"] is None
    assert written["calibration_data"] == "12 examples passed in Python (no dataset name given)"

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    inputs = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reloaded(inputs).logits, model(inputs).logits)


def test_one_shard_per_block_written_as_it_goes(tmp_path, monkeypatch):
    dense = _dense(tmp_path, "llama")
    written = []
    original = hf_fwsvd.layerwise.save_file

    def record(tensors, path, metadata=None):
        written.append((os.path.basename(path), sorted(tensors)))
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_fwsvd.layerwise, "save_file", record)
    compress_layerwise(dense, tmp_path / "out", _config("llama"), show_progress=False)
    assert [name for name, _ in written] == [f"model.fwsvd-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(not key.startswith("model.layers.") for key in written[0][1])  # embeddings, final norm
    for block, (_, keys) in enumerate(written[1:]):
        assert keys and all(key.startswith(f"model.layers.{block}.") for key in keys)
        assert sum(key.endswith((".down.weight", ".up.weight")) for key in keys) == 14  # 7 projections
    with open(tmp_path / "out" / "model.fwsvd.safetensors.index.json", encoding="utf-8") as handle:
        weight_map = json.load(handle)["weight_map"]
    assert {key: name for name, keys in written for key in keys} == weight_map


def test_fisher_with_disk_offload_and_cache_then_resume(tmp_path, reference, monkeypatch):
    dense, model, saved = reference("gpt2")
    cache = str(tmp_path / "importances.safetensors")
    offloaded = AutoModelForCausalLM.from_pretrained(
        dense, device_map=GPT2_OFFLOAD_MAP, offload_folder=str(tmp_path / "offload-check")
    )
    assert offloaded.transformer.h[0].attn.c_attn.weight.device.type == "meta"  # really offloaded
    expected = compute_importances(AutoModelForCausalLM.from_pretrained(dense), _config("gpt2"), show_progress=False)
    importances = compute_importances(offloaded, _config("gpt2"), show_progress=False)
    for name, value in expected.items():
        torch.testing.assert_close(importances[name], value, rtol=1e-5, atol=0)

    out = str(tmp_path / "layerwise")
    compress_layerwise(
        dense, out, _config("gpt2", importances_cache=cache), device_map=GPT2_OFFLOAD_MAP,
        offload_folder=tmp_path / "offload", show_progress=False,
    )  # fmt: skip
    reference_tensors = _tensors(saved)
    tensors = _tensors(out)
    for key, value in reference_tensors.items():
        torch.testing.assert_close(tensors[key], value, rtol=1e-4, atol=1e-6)

    def no_estimation(*args, **kwargs):
        raise AssertionError("estimated again despite the cache")

    monkeypatch.setattr(hf_fwsvd.layerwise, "_estimate", no_estimation)
    again = str(tmp_path / "again")
    compress_layerwise(dense, again, _config("gpt2", importances_cache=cache), show_progress=False)
    assert all(torch.equal(value, tensors[key]) for key, value in _tensors(again).items())


def test_compress_refuses_offloaded_model_and_points_to_layerwise(tmp_path):
    dense = _dense(tmp_path, "gpt2")
    offloaded = AutoModelForCausalLM.from_pretrained(
        dense, device_map=GPT2_OFFLOAD_MAP, offload_folder=str(tmp_path / "offload")
    )
    with pytest.raises(ValueError, match="meta device .* use `hf_fwsvd.compress_layerwise`"):
        compress(offloaded, _config("gpt2"), show_progress=False)


def test_layerwise_errors(tmp_path, reference):
    dense, _, saved = reference("llama")
    with pytest.raises(ValueError, match="already quantized \\(fwsvd\\)"):
        compress_layerwise(saved, tmp_path / "x", _config("llama"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "dense-llama" / "config.json").read_text())
    with pytest.raises(ValueError, match="has no model.safetensors.index.json or model.safetensors"):
        compress_layerwise(empty, tmp_path / "y", _config("llama"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("first_token_weight", [None, 0.1])
def test_layerwise_kfac_whiten_equals_compress(tmp_path, first_token_weight):
    """The two-sided method's output-gradient statistic (and, with `first_token_weight`, the first-token parts of
    both moments, padded batches included) is collected block by block exactly as in memory."""
    dense = _dense(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(dense)
    config = _config("llama", method="kfac_whiten", first_token_weight=first_token_weight)
    compress(model, config, show_progress=False)
    saved = str(tmp_path / "in-memory")
    model.save_pretrained(saved)
    out = str(tmp_path / "layerwise")
    compress_layerwise(dense, out, config, show_progress=False)
    expected, tensors = _tensors(saved), _tensors(out)
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[key], value) for key, value in expected.items())


def test_layerwise_keeps_the_same_sink_modules_dense_as_compress(tmp_path):
    """The first-token output energy is collected block by block exactly as in memory, so the same modules stay
    dense and the checkpoints are equal."""
    dense = _dense(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(dense)
    probe = _config("llama", method="kfac_whiten")
    loader = build_calibration_loader(probe.calibration_dataset, None, model, batch_size=4, max_length=128,
                                      num_samples=None)  # fmt: skip
    ratios = first_token_energy_ratios(
        collect(model, loader, find_target_modules(model, probe), ["first_token_output_energy"])
    )
    ordered = sorted(ratios.values(), reverse=True)
    config = FWSVDConfig(method="kfac_whiten", param_budget=0.7, sink_threshold=(ordered[1] + ordered[2]) / 2,
                         calibration_dataset=probe.calibration_dataset, batch_size=4)  # fmt: skip
    compress(model, config, show_progress=False)
    saved = str(tmp_path / "in-memory")
    model.save_pretrained(saved)
    out = str(tmp_path / "layerwise")
    report = compress_layerwise(dense, out, config, show_progress=False)
    sinks = [name for name, ratio in ratios.items() if ratio > config.sink_threshold]
    assert len(sinks) == 2 and set(sinks) <= set(report.dense_modules)
    assert report.dense_modules == model.fwsvd_report.dense_modules
    expected, tensors = _tensors(saved), _tensors(out)
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[key], value) for key, value in expected.items())
