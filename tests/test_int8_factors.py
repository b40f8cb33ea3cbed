"""int8 factors (`FWSVDConfig(factor_dtype="int8")`): torchao storage, bit-exact save/reload, byte budgets."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import calibration_data, tiny_bert, tiny_llama
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.allocation import ModuleCost, allocate_ranks
from hf_fwsvd.factor_storage import INT8_STORAGE, balanced_factors, quantize_factors, storage_bytes
from hf_fwsvd.factorize import factorize

pytest.importorskip("torchao")

MODELS = {
    "bert": (tiny_bert, AutoModelForSequenceClassification),
    "llama": (tiny_llama, AutoModelForCausalLM),
}
PARTS = ("qdata", "scale", "zero_point")


def _compressed(arch: str, **kwargs):
    torch.manual_seed(0)
    model = MODELS[arch][0]().eval()
    config = FWSVDConfig(
        method="whiten", calibration_dataset=calibration_data(arch), batch_size=4, factor_dtype="int8", **kwargs
    )
    compress(model, config, show_progress=False)
    return model


def _low_rank(model) -> dict[str, LowRankLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


@pytest.mark.parametrize("arch", list(MODELS), ids=list(MODELS))
def test_int8_factors_save_and_reload_bit_exactly(arch, tmp_path, sample_input):
    model = _compressed(arch, rank_ratio=0.5)
    low_rank = _low_rank(model)
    assert low_rank
    for module in low_rank.values():
        for part in ("down", "up"):
            weight = getattr(module, part).weight
            assert weight.qdata.dtype == torch.int8
            assert weight.scale.shape == (weight.shape[0], 1)  # one scale per output row: per-channel
    model.save_pretrained(tmp_path)

    with safe_open(tmp_path / "model.fwsvd.safetensors", "pt") as handle:
        keys = set(handle.keys())
        for name in low_rank:
            assert not {f"{name}.weight", f"{name}.down.weight", f"{name}.up.weight"} & keys
            for part in ("down", "up"):
                assert handle.get_tensor(f"{name}.{part}.weight_qdata").dtype == torch.int8
                assert {f"{name}.{part}.weight_{p}" for p in PARTS} <= keys
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["factor_dtype"] == "int8"
    report = json.loads((tmp_path / "fwsvd_report.json").read_text())
    assert report["factor_storage"] == INT8_STORAGE
    assert 0 < report["module_bytes_after"] < report["module_bytes_before"]
    card = (tmp_path / "README.md").read_text()
    assert f"| Factor storage | {INT8_STORAGE} |" in card
    assert f"{report['module_bytes_before']:,} -> {report['module_bytes_after']:,}" in card

    reloaded, info = MODELS[arch][1].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert set(_low_rank(reloaded)) == set(low_rank)
    state = reloaded.state_dict()
    for name, module in _low_rank(reloaded).items():
        assert f"{name}.weight" not in state  # no dense weight on a compressed module
        assert {key for key, _ in module.named_parameters()} <= {"down.weight", "up.weight", "up.bias"}
        for part in ("down", "up"):
            expected, actual = getattr(low_rank[name], part).weight, getattr(module, part).weight
            assert type(actual) is type(expected)
            for field in PARTS:
                assert torch.equal(getattr(actual, field), getattr(expected, field)), (name, part, field)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**sample_input).logits, model(**sample_input).logits)


def test_int8_error_is_small_on_a_layer():
    torch.manual_seed(0)
    dense = nn.Linear(96, 64)
    module = LowRankLinear.from_linear(dense, rank=24)
    holder = nn.Module()
    holder.layer = module
    inputs = torch.randn(256, 96)
    with torch.no_grad():
        float_out = module(inputs)
        quantize_factors(holder, ["layer"])
        int8_out = holder.layer(inputs)
    relative = float((int8_out - float_out).norm() / float_out.norm())
    assert 0 < relative < 0.02
    with torch.no_grad():  # the dense export (`to_linear`, `.weight`) dequantises the int8 factors
        torch.testing.assert_close(holder.layer.to_linear()(inputs), int8_out, rtol=1e-4, atol=1e-5)


def test_balanced_factors_split_the_singular_values():
    torch.manual_seed(0)
    weight = torch.randn(40, 30)
    factors = factorize(weight, 12)
    balanced = balanced_factors(factors)
    singular = torch.linalg.svdvals(weight)[:12]
    torch.testing.assert_close(balanced.down.norm(dim=1), singular.sqrt(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(balanced.up.norm(dim=0), singular.sqrt(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(balanced.up @ balanced.down, factors.up @ factors.down, rtol=1e-4, atol=1e-5)


def test_int8_checkpoint_is_smaller_by_the_expected_bytes(tmp_path):
    torch.manual_seed(0)
    float_model, int8_model = tiny_llama().eval(), tiny_llama().eval()
    int8_model.load_state_dict(float_model.state_dict())
    compress(float_model, FWSVDConfig(method="svd", rank=4), show_progress=False)
    compress(int8_model, FWSVDConfig(method="svd", rank=4, factor_dtype="int8"), show_progress=False)
    float_model.save_pretrained(tmp_path / "fp32")
    int8_model.save_pretrained(tmp_path / "int8")
    factor_bytes, other_bytes = {}, {}
    for kind in ("fp32", "int8"):
        path = tmp_path / kind / "model.fwsvd.safetensors"
        with safe_open(path, "pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        sizes = {key: tensor.numel() * tensor.element_size() for key, tensor in tensors.items()}
        factor_bytes[kind] = sum(size for key, size in sizes.items() if ".down." in key or ".up." in key)
        other_bytes[kind] = sum(sizes.values()) - factor_bytes[kind]
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        assert path.stat().st_size == header + sum(sizes.values())  # the file is exactly these tensors on disk
    expected_fp32 = expected_int8 = 0
    for module in _low_rank(float_model).values():
        elements = module.rank * (module.in_features + module.out_features)
        expected_fp32 += 4 * elements
        expected_int8 += elements + 5 * (module.rank + module.out_features)  # + fp32 scale, int8 zero point per row
    assert factor_bytes == {"fp32": expected_fp32, "int8": expected_int8}
    assert other_bytes["fp32"] == other_bytes["int8"]  # embeddings, norms, ...: untouched
    assert sum(storage_bytes(p) for m in _low_rank(int8_model).values() for p in m.parameters()) == expected_int8


@pytest.mark.parametrize("factor_dtype", [None, "int8"], ids=["float", "int8"])
def test_byte_budget_holds_for_the_stored_bytes(factor_dtype):
    model, stored, dense_bytes, _ = _byte_budget_model(factor_dtype)
    assert stored <= 0.3 * dense_bytes


def test_byte_budget_gives_int8_factors_a_higher_rank():
    kept = {dtype: _byte_budget_model(dtype)[3] for dtype in (None, "int8")}
    assert kept["int8"] > kept[None]


def _byte_budget_model(factor_dtype: str | None, budget: float = 0.3):
    """A tiny Llama compressed to `budget` of its block weights' bytes; returns it, the bytes its targets take as
    stored, their dense fp32 bytes and the summed rank (a dense module counts its full rank)."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    config = FWSVDConfig(method="whiten", calibration_dataset=calibration_data("llama"), batch_size=4,
                         param_budget=budget, budget_unit="bytes", allocation_power=1.0,
                         factor_dtype=factor_dtype)  # fmt: skip
    compress(model, config, show_progress=False)
    dense = [model.get_submodule(name).weight for name in model.fwsvd_report.dense_modules]
    low_rank = _low_rank(model).values()
    stored = sum(storage_bytes(m.down.weight) + storage_bytes(m.up.weight) for m in low_rank)
    stored += sum(storage_bytes(weight) for weight in dense)
    dense_bytes = 4 * (sum(row.params_before for row in model.fwsvd_report.modules) + sum(w.numel() for w in dense))
    kept_rank = sum(m.rank for m in low_rank) + sum(min(weight.shape) for weight in dense)
    return model, stored, dense_bytes, kept_rank


def test_allocation_in_bytes_stays_within_budget():
    shapes = {"a": (32, 48), "b": (48, 32), "c": (16, 64)}
    scores = {name: torch.linspace(1.0, 0.01, min(shape), dtype=torch.float64) for name, shape in shapes.items()}
    costs = {name: ModuleCost(direction=(o + i) + 5, dense=o * i * 4, fixed=o * 5) for name, (o, i) in shapes.items()}
    for budget in (0.1, 0.2, 0.4, 0.8):
        allocation = allocate_ranks(shapes, scores, budget, costs)
        used = sum(costs[n].fixed + r * costs[n].direction for n, r in allocation.ranks.items())
        used += sum(costs[n].dense for n in allocation.dense)
        assert used == allocation.kept_params <= allocation.budget_params
        assert all(rank < min(shapes[name]) for name, rank in allocation.ranks.items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor_dtype": "int4"}, "Unknown factor_dtype 'int4'; choose one of int8, or None to keep the model "),
        ({"budget_unit": "kb", "param_budget": 0.5}, "Unknown budget_unit 'kb'; choose one of params, bytes."),
        ({"budget_unit": "bytes", "rank": 2}, '`budget_unit="bytes"` needs `param_budget=`'),
    ],
    ids=["factor-dtype", "budget-unit", "bytes-without-budget"],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        FWSVDConfig(**kwargs)


def test_missing_torchao_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ImportError, match=r"`pip install torchao`"):
        FWSVDConfig(factor_dtype="int8")
