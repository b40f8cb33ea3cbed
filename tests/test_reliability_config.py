"""Reliability: bad ranks, methods and target patterns fail with errors that name the argument or module."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_bert, tiny_gpt2
from reliability_cases import fails_with
from transformers import AutoModelForSequenceClassification

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress

QUERY = "bert.encoder.layer.0.attention.self.query"

CONFIG_CASES = {
    "rank-zero": ({"rank": 0}, "`rank` must be a positive int, got 0."),
    "rank-negative": ({"rank": -3}, "`rank` must be a positive int, got -3."),
    "rank-float": ({"rank": 2.0}, "`rank` must be a positive int, got 2.0 (float)."),
    "rank-bool": ({"rank": True}, "`rank` must be a positive int, got True (bool)."),
    "rank-ratio-one": ({"rank_ratio": 1.0}, "`rank_ratio` must be in (0, 1), got 1.0."),
    "param-ratio-zero": ({"param_ratio": 0.0}, "`param_ratio` must be in (0, 1], got 0.0."),
    "param-ratio-above-one": ({"param_ratio": 1.5}, "`param_ratio` must be in (0, 1], got 1.5."),
    "param-ratio-nan": ({"param_ratio": float("nan")}, "`param_ratio` must be in (0, 1], got nan."),
    "param-ratio-string": ({"param_ratio": "0.5"}, "`param_ratio` must be a float, got '0.5'."),
    "rank-and-rank-ratio": (
        {"rank": 2, "rank_ratio": 0.5},
        "Give only one of `rank`, `rank_ratio`, `param_ratio` and `param_budget`; got rank, rank_ratio.",
    ),
    "unknown-method": (
        {"method": "fisher"},
        "Unknown method 'fisher'; choose one of fwsvd, svd, tfwsvd, whiten, asvd, fisher_whiten, svdllm, "
        "fisher_svdllm, whiten_v2, kfac_whiten, kfac_svdllm.",
    ),
    "rank-pattern-string-value": (
        {"rank_pattern": {"query": "4"}},
        "`rank_pattern['query']` must be a positive int, got '4' (str).",
    ),
    "target-modules-empty-list": (
        {"target_modules": []},
        "`target_modules` is an empty list: nothing would be compressed.",
    ),
    "target-modules-not-a-pattern": (
        {"target_modules": 5},
        "`target_modules` must be a regex string or a list of module names, got 5 (int).",
    ),
    "target-modules-bad-regex": (
        {"target_modules": ".*(query"},
        "`target_modules` pattern '.*(query' is not a valid regular expression: missing ), unterminated subpattern at "
        "position 2.",
    ),
    "modules-to-not-convert-bad-regex": (
        {"modules_to_not_convert": ["layer.[0"]},
        "`modules_to_not_convert` pattern 'layer.[0' is not a valid regular expression: unterminated character set "
        "at position 6.",
    ),
    "num-samples-zero": ({"num_samples": 0}, "`num_samples` must be a positive int, got 0."),
    "importance-floor-negative": ({"importance_floor": -0.1}, "`importance_floor` must be in [0, 1), got -0.1."),
}


@pytest.mark.parametrize("kwargs,message", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_bad_config_values(kwargs, message):
    with fails_with(ValueError, message, entry="FWSVDConfig"):
        FWSVDConfig(**kwargs)


@pytest.mark.parametrize(
    "rank,message",
    [
        (
            100,
            f"Rank 100 for `{QUERY}` (16x16) is not below its full rank 16: the factorised layer would keep 3200 "
            "weights instead of 256. Use a smaller rank, a `rank_ratio`, or exclude the module.",
        ),
        (
            16,
            f"Rank 16 for `{QUERY}` (16x16) is not below its full rank 16: the factorised layer would keep 512 "
            "weights instead of 256. Use a smaller rank, a `rank_ratio`, or exclude the module.",
        ),
    ],
    ids=["rank-above-full", "rank-equal-full"],
)
def test_rank_not_below_full_rank(rank, message):
    model = tiny_bert()
    with fails_with(ValueError, message, entry="compress"):
        compress(model, FWSVDConfig(rank=rank, method="svd"), show_progress=False)
    assert not any(isinstance(module, LowRankLinear) for module in model.modules())


def test_rank_pattern_above_full_rank():
    with fails_with(
        ValueError,
        f"Rank 40 for `{QUERY}` (16x16) is not below its full rank 16: the factorised layer would keep 1280 "
        "weights instead of 256. Use a smaller rank, a `rank_ratio`, or exclude the module.",
        entry="compress",
    ):
        compress(tiny_bert(), FWSVDConfig(rank=2, rank_pattern={"query": 40}, method="svd"), show_progress=False)


def test_target_matches_nothing():
    message = (
        "No module of BertForSequenceClassification matched `target_modules=['attention.qkv']` (after "
        "`modules_to_not_convert`). Linear layers in this model include: bert.encoder.layer.0.attention.self.query, "
        "bert.encoder.layer.0.attention.self.key, bert.encoder.layer.0.attention.self.value, "
        "bert.encoder.layer.0.attention.output.dense, bert.encoder.layer.0.intermediate.dense, "
        "bert.encoder.layer.0.output.dense."
    )
    with fails_with(ValueError, message, entry="compress"):
        compress(tiny_bert(), FWSVDConfig(rank=2, method="svd", target_modules=["attention.qkv"]), show_progress=False)


def test_target_matches_a_non_linear_module():
    message = (
        "`target_modules='.*attention\\\\.output\\\\.LayerNorm'` matches modules that are not linear layers: "
        "bert.encoder.layer.0.attention.output.LayerNorm (LayerNorm), bert.encoder.layer.1.attention.output.LayerNorm "
        "(LayerNorm). Target the Linear/Conv1D leaves, e.g. ['query', 'key', 'value'] or a regex such as "
        "r'.*\\.(query|key|value)'."
    )
    config = FWSVDConfig(rank=2, method="svd", target_modules=r".*attention\.output\.LayerNorm")
    with fails_with(ValueError, message, entry="compress"):
        compress(tiny_bert(), config, show_progress=False)


def test_everything_excluded_matches_nothing():
    config = FWSVDConfig(rank=2, method="svd", modules_to_not_convert=["transformer"])
    message = (
        "No module of GPT2LMHeadModel matched `target_modules=None` (after `modules_to_not_convert`). Linear layers "
        "in this model include: transformer.h.0.attn.c_attn, transformer.h.0.attn.c_proj, transformer.h.0.mlp.c_fc, "
        "transformer.h.0.mlp.c_proj, transformer.h.1.attn.c_attn, transformer.h.1.attn.c_proj."
    )
    with fails_with(ValueError, message, entry="compress"):
        compress(tiny_gpt2(), config, show_progress=False)


def test_compressing_twice_is_refused():
    model = compress(tiny_bert(), FWSVDConfig(rank=2, method="svd"), show_progress=False)
    with fails_with(
        ValueError,
        "BertForSequenceClassification is already FWSVD-compressed; compress the dense model instead.",
        entry="compress",
    ):
        compress(model, FWSVDConfig(rank=2, method="svd"), show_progress=False)


def test_from_pretrained_rejects_wrong_config_type(saved_dense):
    dense_dir, _ = saved_dense("bert")
    with fails_with(TypeError, "`fwsvd_config` must be an FWSVDConfig, got dict.", entry="from_pretrained"):
        AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config={"rank": 2})


def test_from_pretrained_rejects_two_configs(saved_dense):
    dense_dir, _ = saved_dense("bert")
    config = FWSVDConfig(rank=2, method="svd")
    with fails_with(
        ValueError, "Pass either `fwsvd_config=` or `quantization_config=`, not both.", entry="from_pretrained"
    ):
        AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config=config, quantization_config=config)


def test_compress_on_load_bad_rank_raises_instead_of_returning_a_model(saved_dense):
    dense_dir, _ = saved_dense("bert")
    config = FWSVDConfig(rank=16, calibration_dataset=calibration_data("bert"))
    with fails_with(
        ValueError,
        f"Rank 16 for `{QUERY}` (16x16) is not below its full rank 16: the factorised layer would keep 512 weights "
        "instead of 256. Use a smaller rank, a `rank_ratio`, or exclude the module.",
        entry="from_pretrained",
    ):
        AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config=config)


def test_valid_config_still_compresses():
    """Guard against over-eager validation: the boundary values are accepted."""
    model = tiny_bert()
    compress(model, FWSVDConfig(param_ratio=1.0, method="svd", target_modules=["query"]), show_progress=False)
    # param_ratio=1.0 would give rank 8 (as many weights as the dense 16x16 layer, and slower); param_ratio ranks are
    # clamped to the largest rank that runs faster than dense (hf_fwsvd.payoff): 0.8 * 256 / 32 = 6.4 -> 6.
    assert model.bert.encoder.layer[0].attention.self.query.rank == 6
    assert torch.isfinite(model.bert.encoder.layer[0].attention.self.query.weight).all()
