"""`hf_fwsvd.int8_deploy`: the folded SmoothQuant smoothing of low-rank layers and the dynamic int8 copy."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import sentences, tiny_bert, tiny_tokenizer
from torch import nn
from transformers import BertForSequenceClassification

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress, int8_deploy
from hf_fwsvd.int8_deploy import (
    FullRangeDynamicLinear,
    collect_input_absmax,
    fold_smoothing,
    quantize_int8,
    smoothing_scales,
)

DynamicLinear = torch.ao.nn.quantized.dynamic.Linear
TEXTS = sentences(12)


def compressed_bert() -> nn.Module:
    torch.manual_seed(0)
    return compress(tiny_bert(), FWSVDConfig(method="svd", rank=4), show_progress=False).eval()


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_smoothing_scales_match_the_smoothquant_formula_entry_by_entry():
    torch.manual_seed(0)
    weight, absmax = torch.randn(5, 3), torch.rand(3) * 10
    for alpha in (0.25, 0.5, 1.0):
        expected = torch.tensor(
            [
                max(absmax[j].item(), 1e-8) ** alpha / max(abs(weight[i, j].item()) for i in range(5)) ** (1 - alpha)
                for j in range(3)
            ]
        )
        assert torch.allclose(smoothing_scales(weight, absmax, alpha), expected, rtol=1e-6)
    assert torch.allclose(
        smoothing_scales(torch.tensor([[1.0, -4.0]]), torch.tensor([9.0, 1.0]), 0.5), torch.tensor([3.0, 0.5])
    )


def test_collect_input_absmax_is_the_brute_force_maximum():
    model = compressed_bert()
    tokenizer = tiny_tokenizer()
    absmax = collect_input_absmax(
        model, TEXTS, tokenizer, ["bert.encoder.layer.0.output.dense.up"], batch_size=4, show_progress=False
    )
    seen = []
    handle = model.get_submodule("bert.encoder.layer.0.output.dense.up").register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]))
    )
    for start in range(0, 12, 4):
        batch = tokenizer(TEXTS[start : start + 4], padding=True, return_tensors="pt")
        with torch.no_grad():
            model(**batch)
    handle.remove()
    assert list(absmax) == ["bert.encoder.layer.0.output.dense.up"]
    assert torch.allclose(absmax["bert.encoder.layer.0.output.dense.up"], torch.cat(seen).abs().amax(0))


def test_fold_leaves_fp32_outputs_equal_and_applies_the_scales_to_the_factors(sample_input):
    model = compressed_bert()
    before = copy.deepcopy(model)
    absmax = collect_input_absmax(model, TEXTS, tiny_tokenizer(), show_progress=False)
    scales = fold_smoothing(model, TEXTS, tiny_tokenizer(), alpha=0.5, show_progress=False)
    assert len(scales) == 12  # 2 layers x 6 linears
    name = "bert.encoder.layer.1.intermediate.dense"
    old, new = before.get_submodule(name), model.get_submodule(name)
    expected = smoothing_scales(old.up.weight, absmax[f"{name}.up"], 0.5)
    assert torch.allclose(scales[name], expected)
    assert torch.allclose(new.down.weight, old.down.weight / expected[:, None])
    assert torch.allclose(new.up.weight, old.up.weight * expected)
    assert torch.equal(new.up.bias, old.up.bias)
    assert torch.allclose(logits(model, sample_input), logits(before, sample_input), rtol=1e-5, atol=1e-6)
    folded_absmax = collect_input_absmax(model, TEXTS, tiny_tokenizer(), [f"{name}.up"], show_progress=False)
    assert torch.allclose(folded_absmax[f"{name}.up"], absmax[f"{name}.up"] / expected, rtol=1e-4)


def test_folded_model_saves_and_reloads_as_an_fwsvd_checkpoint(tmp_path, sample_input):
    model = compressed_bert()
    fold_smoothing(model, TEXTS, tiny_tokenizer(), show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == 12
    assert torch.allclose(logits(reloaded, sample_input), logits(model, sample_input), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [7, 8], ids=["7-bit", "8-bit"])
def test_quantize_int8_makes_every_linear_dynamic_int8_close_to_fp32(monkeypatch, sample_input, bits):
    monkeypatch.setattr(int8_deploy, "cpu_has_int8_dot_product", lambda: True)
    model = compressed_bert()
    quantised = quantize_int8(model, TEXTS, tiny_tokenizer(), activation_bits=bits, show_progress=False)
    kinds = [type(m) for m in quantised.modules() if isinstance(m, (nn.Linear, DynamicLinear))]
    expected = FullRangeDynamicLinear if bits == 8 else DynamicLinear
    assert kinds == [expected] * 26  # 12 low-rank layers x 2 factors + the pooler + the classifier
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # the input is untouched
    found, reference = logits(quantised, sample_input), logits(model, sample_input)
    assert not torch.equal(found, reference)
    assert torch.allclose(found, reference, atol=0.05)


def test_seven_bit_path_asks_fbgemm_for_reduce_range(monkeypatch):
    calls = []
    original = torch.ops.quantized.linear_dynamic

    def spy(x, packed, reduce_range=False):
        calls.append(reduce_range)
        return original(x, packed, reduce_range)

    quantised = {bits: quantize_int8(compressed_bert(), smooth_alpha=None, activation_bits=bits) for bits in (7, 8)}
    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic", spy)
    for bits in (7, 8):
        layer = quantised[bits].get_submodule("bert.encoder.layer.0.output.dense.up")
        layer(torch.randn(3, layer.in_features))
    assert calls == [True, False]


def test_auto_activation_bits_follow_the_cpu(monkeypatch, caplog):
    for has, expected in ((True, FullRangeDynamicLinear), (False, DynamicLinear)):
        monkeypatch.setattr(int8_deploy, "cpu_has_int8_dot_product", lambda has=has: has)
        with caplog.at_level("INFO", logger="hf_fwsvd.int8_deploy"):
            quantised = quantize_int8(compressed_bert(), smooth_alpha=None)
        assert {type(m) for m in quantised.modules()} & {DynamicLinear, FullRangeDynamicLinear} == {expected}
    assert "activation_bits='auto': 8-bit activations (the CPU has AVX512-VNNI or AMX)." in caplog.text
    assert "activation_bits='auto': 7-bit activations (the CPU has neither AVX512-VNNI nor AMX)." in caplog.text


def test_eight_bits_without_vnni_is_refused(monkeypatch):
    monkeypatch.setattr(int8_deploy, "cpu_has_int8_dot_product", lambda: False)
    message = (
        "`activation_bits=8` needs a CPU with AVX512-VNNI or AMX (without them fbgemm's 8-bit activations can "
        "overflow and give wrong outputs); this CPU has neither: use `activation_bits=7` or 'auto'."
    )
    with pytest.raises(ValueError) as error:
        quantize_int8(compressed_bert(), smooth_alpha=None, activation_bits=8)
    assert str(error.value) == message


NO_DATA = (
    "Smoothing needs calibration data: pass `calibration_dataset=` (and `tokenizer=` for text), or "
    "`smooth_alpha=None` to skip smoothing."
)


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        (
            tiny_bert,
            {"calibration_dataset": TEXTS},
            "The model has no LowRankLinear layer to smooth: compress it first (`hf_fwsvd.compress`) or pass "
            "`smooth_alpha=None` to quantise without smoothing.",
        ),
        (compressed_bert, {}, NO_DATA),
        (
            compressed_bert,
            {"calibration_dataset": TEXTS, "smooth_alpha": 1.5},
            "`smooth_alpha` must be in (0, 1], got 1.5; 0.5 is SmoothQuant's default, None skips smoothing.",
        ),
        (
            compressed_bert,
            {"calibration_dataset": TEXTS, "smooth_alpha": 0},
            "`smooth_alpha` must be in (0, 1], got 0; 0.5 is SmoothQuant's default, None skips smoothing.",
        ),
        (
            compressed_bert,
            {"smooth_alpha": None, "activation_bits": 4},
            "`activation_bits` must be 'auto', 7 or 8, got 4.",
        ),
        (
            compressed_bert,
            {"calibration_dataset": []},
            "`calibration_dataset` is empty: FWSVD needs at least one calibration example.",
        ),
        (
            compressed_bert,
            {"input_absmax": {}},
            "`input_absmax` has no range for 'bert.encoder.layer.0.attention.self.query.up'; collect it with "
            "`collect_input_absmax`.",
        ),
    ],
    ids=["dense-model", "no-data", "alpha-above-one", "alpha-zero", "bits", "empty-data", "absmax-missing"],
)
def test_bad_input_errors(model, kwargs, message):
    kwargs = {"tokenizer": tiny_tokenizer(), "activation_bits": 7, "show_progress": False} | kwargs
    with pytest.raises(ValueError) as error:
        quantize_int8(model(), **kwargs)
    assert str(error.value) == message


def test_fold_smoothing_errors():
    with pytest.raises(ValueError) as error:
        fold_smoothing(compressed_bert(), TEXTS, tiny_tokenizer(), alpha=-0.5)
    assert str(error.value) == "`alpha` must be in (0, 1], got -0.5; 0.5 is SmoothQuant's default."
    with pytest.raises(ValueError) as error:
        fold_smoothing(compressed_bert())
    assert str(error.value) == NO_DATA
    with pytest.raises(ValueError) as error:
        collect_input_absmax(compressed_bert(), TEXTS, tiny_tokenizer(), ["bert.encoder.layer.0.output.dense"])
    assert str(error.value) == "`modules`: 'bert.encoder.layer.0.output.dense' is not an nn.Linear of the model."


def test_cpu_check_reads_proc_cpuinfo_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for name in ("_is_vnni_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    flags = {"flags : fpu avx2 avx512f": False, "flags : fpu avx512_vnni": True, "flags : amx_int8 amx_tile": True}
    for text, expected in flags.items():
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(text)
        monkeypatch.setattr(int8_deploy, "Path", lambda _path, cpuinfo=cpuinfo: cpuinfo)
        assert int8_deploy.cpu_has_int8_dot_product() is expected
