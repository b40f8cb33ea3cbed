"""The low rank + int8 recipes' pieces: module groups of an MPNet task model, the SmoothQuant-style smoothing, the
variant grammar and which linears `dynamic_int8` quantises."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_tokenizer
from torch import nn
from transformers import MPNetConfig, MPNetForSequenceClassification

from benchmarks.int8_recipes import (
    FullRangeDynamicLinear,
    SmoothedInput,
    activation_absmax,
    base_name,
    base_seed,
    dynamic_int8,
    int8_sensitivity,
    module_tags,
    parse_base,
    parse_variant,
    smoothing_scales,
)
from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.int8_deploy import quantize_int8

DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


def tiny_mpnet() -> MPNetForSequenceClassification:
    config = MPNetConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    return MPNetForSequenceClassification(config).eval()


def inputs() -> dict:
    return {"input_ids": torch.randint(3, 60, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}


@pytest.mark.parametrize(
    ("name", "tags"),
    [
        ("mpnet.encoder.layer.0.attention.attn.k", {"qkv"}),
        ("mpnet.encoder.layer.11.attention.attn.o", {"attn_out"}),
        ("mpnet.encoder.layer.3.intermediate.dense.down", {"ffn_in", "down"}),
        ("mpnet.encoder.layer.3.output.dense.up", {"ffn_out", "up"}),
        ("classifier.out_proj", {"head"}),
    ],
)
def test_module_tags(name, tags):
    assert module_tags(name) == tags


def test_module_tags_rejects_other_modules():
    with pytest.raises(ValueError, match="'pooler.dense' is not a linear of an MPNet task model"):
        module_tags("pooler.dense")


def test_smoothing_scales_by_hand():
    weight = torch.tensor([[1.0, -4.0], [0.5, 2.0]])
    absmax = torch.tensor([9.0, 1.0])
    # s_j = absmax_j^0.5 / max_i |W_ij|^0.5: column maxima 1 and 4
    assert torch.allclose(smoothing_scales(weight, absmax, 0.5), torch.tensor([3.0, 0.5]))
    assert torch.allclose(smoothing_scales(weight, absmax, 1.0), absmax)


def test_smoothed_input_is_the_same_map_and_helps_int8_on_an_outlier_channel():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    x = torch.randn(64, 8)
    x[:, 2] *= 200.0  # one outlier channel, as LayerNorm outputs of transformers have
    expected = linear(x).detach()
    scale = smoothing_scales(linear.weight, x.abs().amax(0), 0.5)
    smoothed = SmoothedInput(copy.deepcopy(linear), scale)
    assert torch.allclose(smoothed.linear.weight, linear.weight * scale)
    with torch.no_grad():
        assert torch.allclose(smoothed(x), expected, rtol=1e-4, atol=1e-3)
        plain_error = (torch.ao.quantization.quantize_dynamic(nn.Sequential(linear))(x) - expected).abs().mean()
        smoothed_int8 = torch.ao.quantization.quantize_dynamic(nn.Sequential(smoothed))
        smoothed_error = (smoothed_int8(x) - expected).abs().mean()
    assert smoothed_error < 0.8 * plain_error  # 0.36 vs 0.49 here


def test_parse_variant():
    assert parse_variant("smooth0.5,skip-ffn_out.down+head") == {
        "alpha": 0.5,
        "skip": {frozenset({"ffn_out", "down"}), frozenset({"head"})},
        "only": None,
        "per_channel": False,
        "float": False,
        "full_range": False,
        "smooth": None,
        "per_token": set(),
        "library": False,
    }
    assert parse_variant("lib")["library"] is True
    with pytest.raises(ValueError, match="'lib' is the library recipe as a whole; use it alone"):
        parse_variant("lib,fullrange")
    assert parse_variant("smooth0.8-ffn_out.down")["smooth"] == {frozenset({"ffn_out", "down"})}
    assert parse_variant("only-up,perchannel")["only"] == {frozenset({"up"})}
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['ffn'\]"):
        parse_variant("skip-ffn")
    with pytest.raises(ValueError, match="unknown part 'int4'"):
        parse_variant("int4")


@pytest.mark.parametrize(
    ("variant", "count"),
    [
        ("fp32", 0),
        ("int8", 14),
        ("only-ffn_in", 2),
        ("skip-qkv+head", 6),
        ("smooth0.5,skip-ffn_out", 12),
        ("smooth0.5-ffn_in", 14),
    ],
)
def test_dynamic_int8_quantises_the_chosen_linears(variant, count):
    torch.manual_seed(0)
    model = tiny_mpnet()
    absmax = activation_absmax(model, tiny_tokenizer(), [{"text": "w3 w4 w5"}, {"text": "w6 w7"}])
    built = dynamic_int8(model, variant, absmax)
    assert sum(isinstance(m, DynamicLinear) for m in built.modules()) == count
    smoothed = {"smooth0.5,skip-ffn_out": 12, "smooth0.5-ffn_in": 2}.get(variant, 0)
    assert sum(isinstance(m, SmoothedInput) for m in built.modules()) == smoothed
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # the base is untouched
    batch = inputs()
    with torch.no_grad():
        expected, found = model(**batch).logits, built(**batch).logits
    assert torch.allclose(found, expected, atol=0.05)
    assert torch.equal(found, expected) == (count == 0)


def test_full_range_halves_the_activation_rounding_error():
    torch.manual_seed(0)
    model = tiny_mpnet()
    seven_bit, eight_bit = dynamic_int8(model, "int8"), dynamic_int8(model, "int8,fullrange")
    assert {type(m) for m in seven_bit.modules()} & {DynamicLinear, FullRangeDynamicLinear} == {DynamicLinear}
    assert {type(m) for m in eight_bit.modules()} & {DynamicLinear, FullRangeDynamicLinear} == {FullRangeDynamicLinear}
    batch = inputs()
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True).hidden_states[-1]
        seven_error = (seven_bit(**batch, output_hidden_states=True).hidden_states[-1] - expected).abs().mean()
        eight_error = (eight_bit(**batch, output_hidden_states=True).hidden_states[-1] - expected).abs().mean()
    assert eight_error < 0.7 * seven_error


def test_dynamic_int8_smoothing_needs_absmax():
    with pytest.raises(ValueError, match="pass absmax=activation_absmax"):
        dynamic_int8(tiny_mpnet(), "smooth0.5")


class _Tokenizer:
    """Maps each word to a token id, enough for `length_sorted_batches`."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[3 + ord(word[0]) % 50 for word in text.split()][:max_length] for text in texts]
        width = max(len(row) for row in ids)
        return {
            "input_ids": torch.tensor([row + [1] * (width - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]),
        }


def test_skip_can_name_one_factor_of_a_low_rank_model():
    torch.manual_seed(0)
    low_rank = compress(tiny_mpnet(), FWSVDConfig(method="svd", rank=2), show_progress=False)
    assert sum(isinstance(m, LowRankLinear) for m in low_rank.modules()) == 12  # 2 layers x 6, the head stays
    built = dynamic_int8(low_rank, "skip-ffn_out.down")
    kept = [n for n, m in built.named_modules() if type(m) is nn.Linear]
    assert kept == ["mpnet.encoder.layer.0.output.dense.down", "mpnet.encoder.layer.1.output.dense.down"]
    assert sum(isinstance(m, DynamicLinear) for m in built.modules()) == 24 + 2 - 2


def test_per_token_groups_go_through_torchao():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = tiny_mpnet()
    built = dynamic_int8(model, "pertoken-ffn_out+head")
    torchao = [n for n, m in built.named_modules() if type(m) is nn.Linear]
    assert torchao == [
        "mpnet.encoder.layer.0.output.dense",
        "mpnet.encoder.layer.1.output.dense",
        "classifier.dense",
        "classifier.out_proj",
    ]
    assert {type(built.get_submodule(n).weight).__name__ for n in torchao} == {"Int8Tensor"}
    assert sum(isinstance(m, DynamicLinear) for m in built.modules()) == 10
    batch = inputs()
    with torch.no_grad():
        assert torch.allclose(built(**batch).logits, model(**batch).logits, atol=0.05)


def test_int8_sensitivity_is_zero_for_the_model_itself_and_positive_for_int8():
    torch.manual_seed(0)
    model = tiny_mpnet()
    examples = [{"text": "a b c d"}, {"text": "e f"}, {"text": "g h i"}]
    same = int8_sensitivity(model, dynamic_int8(model, "fp32"), _Tokenizer(), examples)
    assert same["feature_error"] == same["head_error"] == same["flipped"] == 0.0 and same["margin"] > 0
    quantised = int8_sensitivity(model, dynamic_int8(model, "int8"), _Tokenizer(), examples)
    assert 0 < quantised["feature_error"] < 0.2 and 0 < quantised["head_error"] < 0.2
    assert quantised["margin"] == same["margin"]


@pytest.mark.parametrize(
    ("fraction", "finetune", "seed", "rate", "name"),
    [
        (None, False, 0, 2e-4, "dense"),
        (None, True, 1, 2e-4, "dense+ft@1"),
        (0.5, True, 0, 2e-4, "whiten0.5+ft"),
        (0.8, False, 2, 2e-4, "whiten0.8@2"),
        (0.5, True, 1, 5e-5, "whiten0.5+ft5e-05@1"),
    ],
)
def test_base_names_round_trip(fraction, finetune, seed, rate, name):
    assert base_name(fraction, finetune, seed, rate) == name
    assert base_seed(name) == seed
    assert parse_base(name) == (fraction, finetune, seed, rate)


def test_parse_base_reads_a_learning_rate_and_rejects_other_names():
    assert parse_base("whiten0.5+ft5e-5@2") == (0.5, True, 2, 5e-5)
    with pytest.raises(ValueError, match="base 'svd0.5': use dense"):
        parse_base("svd0.5")


def test_lib_variant_is_the_library_recipe_with_the_smoothing_folded(monkeypatch):
    from hf_fwsvd import int8_deploy

    monkeypatch.setattr(int8_deploy, "cpu_has_int8_dot_product", lambda: True)
    torch.manual_seed(0)
    low_rank = compress(tiny_mpnet(), FWSVDConfig(method="svd", rank=4), show_progress=False).eval()
    examples = [{"text": "w3 w4 w5 w9"}, {"text": "w6 w7"}, {"text": "w8 w10 w11"}]
    absmax = activation_absmax(low_rank, tiny_tokenizer(), examples)
    built = dynamic_int8(low_rank, "lib", absmax)
    assert {type(m) for m in built.modules()} & {DynamicLinear, FullRangeDynamicLinear, SmoothedInput, nn.Linear} == {
        FullRangeDynamicLinear
    }
    batch = inputs()
    direct = quantize_int8(low_rank, smooth_alpha=0.5, activation_bits=8, input_absmax=absmax, show_progress=False)
    unfolded = dynamic_int8(low_rank, "smooth0.5-up,fullrange", absmax)
    with torch.no_grad():
        found = built(**batch).logits
        assert torch.equal(found, direct(**batch).logits)
        assert torch.allclose(found, unfolded(**batch).logits, atol=0.02)  # only down's int8 rounding differs
    with pytest.raises(ValueError, match="pass absmax=activation_absmax"):
        dynamic_int8(low_rank, "lib")


def test_paired_stage_uses_mcnemar_for_labels_and_the_pearson_bootstrap_for_regression(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import benchmarks.int8_recipes as recipes

    monkeypatch.setattr(recipes, "RESULTS", tmp_path)
    labels = [0, 1] * 10
    both_wrong_on_3 = [1 - y if i < 3 else y for i, y in enumerate(labels)]
    rows = {"dense:int8": {"pred": labels}, "whiten0.5+ft:lib": {"pred": both_wrong_on_3}}
    targets = torch.linspace(0, 1, 20)
    noisy = (targets + torch.tensor([0.3, -0.3] * 10)).tolist()
    results = {
        "sms_spam|x": {"models": rows},
        "rt_regression|x": {"models": {"dense:int8": {"pred": targets.tolist()}, "whiten0.5+ft:lib": {"pred": noisy}}},
    }
    (tmp_path / "int8_recipes_test.json").write_text(json.dumps(results))
    args = SimpleNamespace(label="x", references=["dense:int8"])

    classification = SimpleNamespace(task="sms_spam", regression=False, labels=torch.tensor(labels))
    assert recipes.paired_stage(classification, args) == {("whiten0.5+ft:lib", "dense:int8"): (0, 3, 0.25)}

    regression = SimpleNamespace(task="rt_regression", regression=True, labels=targets)
    ((pair, (difference, p)),) = recipes.paired_stage(regression, args).items()
    r_noisy = float(torch.corrcoef(torch.stack([torch.tensor(noisy), targets]))[0, 1])
    assert pair == ("whiten0.5+ft:lib", "dense:int8")
    assert difference == pytest.approx(r_noisy - 1.0, abs=1e-6)
    assert p < 0.01
