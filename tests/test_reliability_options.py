"""Reliability: an option that would match nothing or be overridden says so, instead of silently doing nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2
from reliability_cases import expect_warning, fails_with

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.calibration import build_calibration_loader

QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    ("pattern", "shown"),
    [({"qeury": 2}, "'qeury'"), ({"classifier": 1, "query": 2}, "'classifier'"), ({r".*\.layer\.9\..*": 2}, None)],
    ids=["typo", "excluded-head", "regex-no-such-layer"],
)
def test_rank_pattern_key_matching_no_module(pattern, shown):
    model = tiny_bert()
    shown = shown or repr(next(iter(pattern)))
    message = (
        f"`rank_pattern` key(s) {shown} match none of the 12 targeted modules (e.g. "
        "bert.encoder.layer.0.attention.self.query, bert.encoder.layer.0.attention.self.key, "
        "bert.encoder.layer.0.attention.self.value), so their rank would be silently ignored. Use a module name, a "
        "name suffix or a regex of a targeted module."
    )
    with fails_with(ValueError, message, entry="compress"):
        compress(model, FWSVDConfig(rank=4, method="svd", rank_pattern=pattern), show_progress=False)
    assert not any(isinstance(module, LowRankLinear) for module in model.modules())


def test_rank_pattern_that_matches_is_applied():
    model = compress(tiny_bert(), FWSVDConfig(rank=4, method="svd", rank_pattern={"query": 2}), show_progress=False)
    assert model.get_submodule(QUERY).rank == 2


def test_targeting_only_the_untied_lm_head(caplog):
    model = tiny_gpt2(tie_word_embeddings=False)
    message = (
        "`target_modules=['lm_head']` matches the output embedding lm_head, which hf_fwsvd never compresses (it maps "
        "hidden states to the vocabulary and is usually tied to the input embedding). Target the linear layers of "
        "the transformer blocks instead."
    )
    with fails_with(ValueError, message, entry="compress"):
        compress(model, FWSVDConfig(rank=4, method="svd", target_modules=["lm_head"]), show_progress=False)


def test_targeting_the_lm_head_with_other_modules_warns(caplog):
    model = tiny_gpt2(tie_word_embeddings=False)
    config = FWSVDConfig(rank=4, method="svd", target_modules=["lm_head", "c_fc"])
    with caplog.at_level("WARNING", logger="hf_fwsvd.targets"):
        compress(model, config, show_progress=False)
    assert isinstance(model.transformer.h[0].mlp.c_fc, LowRankLinear) and not isinstance(model.lm_head, LowRankLinear)
    expect_warning(
        caplog,
        "hf_fwsvd.targets",
        "`target_modules=['lm_head', 'c_fc']` matches the output embedding lm_head, which hf_fwsvd never compresses "
        "(it maps hidden states to the vocabulary and is usually tied to the input embedding); it stays dense.",
        entry="compress",
    )


def test_explicitly_targeted_default_excluded_head_warns(caplog):
    model = tiny_bert()
    config = FWSVDConfig(rank=4, method="svd", target_modules=["classifier", "query"])
    with caplog.at_level("WARNING", logger="hf_fwsvd.targets"):
        compress(model, config, show_progress=False)
    assert not isinstance(model.classifier, LowRankLinear)
    expect_warning(
        caplog,
        "hf_fwsvd.targets",
        "`target_modules=['classifier', 'query']` matches classifier, excluded by default (task heads and poolers "
        "stay dense); it stays dense. Pass `modules_to_not_convert=[]` to compress it.",
        entry="compress",
    )


def test_default_excluded_head_is_compressed_when_exclusions_are_cleared():
    model = tiny_bert()
    config = FWSVDConfig(rank=1, method="svd", target_modules=["pooler.dense"], modules_to_not_convert=[])
    compress(model, config, show_progress=False)
    assert isinstance(model.bert.pooler.dense, LowRankLinear)


def _causal_batch(records, **kwargs):
    loader = build_calibration_loader(records, model=tiny_gpt2(), batch_size=4, **kwargs)
    return next(iter(loader))


def test_causal_lm_labels_given_by_the_user_are_kept():
    """A user's -100 masking (e.g. the prompt of an instruction example) used to be replaced by the input ids."""
    records = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10], "labels": [-100, 10]},
    ]
    batch = _causal_batch(records)
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["input_ids"][1, :2].tolist() == [9, 10]


def test_causal_lm_without_labels_predicts_every_real_token():
    batch = _causal_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            [7, 8],
            "Calibration example 0 has 2 labels for 4 tokens; causal-lm labels need one per token id (-100 where the "
            "loss should ignore it). Align the labels with the tokenised input (e.g. with `word_ids()`), or give "
            "`tokens` and word labels and let hf_fwsvd align them.",
        ),
        (
            [5, 6, 7, 999],
            "Calibration example 0 has label 999; causal-lm labels must be in [0, 64) or -100 (ignored).",
        ),
    ],
    ids=["wrong-length", "outside-vocabulary"],
)
def test_bad_causal_lm_labels(labels, message):
    with fails_with(ValueError, message, entry="compress"):
        _causal_batch([{"input_ids": [5, 6, 7, 8], "labels": labels}])


def test_causal_lm_fisher_follows_the_user_masking():
    """With the whole sequence masked but the last token, the Fisher equals that of the last-token-only loss."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    masked = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, -100, 8]}]
    full = [{"input_ids": [5, 6, 7, 8]}]
    from hf_fwsvd import compute_importances

    config = dict(rank=4, batch_size=1, num_samples=None)
    with_mask = compute_importances(model, FWSVDConfig(calibration_dataset=masked, **config), show_progress=False)
    without = compute_importances(model, FWSVDConfig(calibration_dataset=full, **config), show_progress=False)
    name = "transformer.h.0.mlp.c_fc"
    assert not torch.allclose(with_mask[name], without[name])
