"""Reliability: bad calibration data and NaN losses fail before any module is touched; the model stays dense."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, calibration_data, tiny_bert, tiny_gpt2
from reliability_cases import expect_warning, fails_with, word_tokenizer
from transformers import BertConfig, BertModel, GPT2Config, GPT2ForSequenceClassification

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.calibration import build_calibration_loader


def assert_untouched(model, original):
    assert not any(isinstance(module, LowRankLinear) for module in model.modules())
    for (name, value), (_, expected) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, equal_nan=True, msg=name)


def run(model, **kwargs):
    config = FWSVDConfig(rank=2, **kwargs)
    return compress(model, config, show_progress=False)


CASES = {
    "no-calibration-data": (
        {},
        "FWSVD needs calibration data to estimate Fisher importances: pass `calibration_dataset=` (and "
        "`tokenizer=`) or precomputed `importances=` in FWSVDConfig, or use `method='svd'`.",
    ),
    "empty": (
        {"calibration_dataset": []},
        "`calibration_dataset` is empty: FWSVD needs at least one calibration example.",
    ),
    "single-dict": (
        {"calibration_dataset": {"text": "good movie", "label": 1}},
        "`calibration_dataset` must be a list of strings, a list of dicts, a `datasets.Dataset` or a DataLoader, got "
        "a single dict.",
    ),
    "not-iterable": ({"calibration_dataset": 5}, "`calibration_dataset` of type int is not iterable."),
    "no-labels": (
        {"calibration_dataset": [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]},
        "The sequence-classification loss needs labels, but 2 of 2 calibration examples have none (first: example "
        "0). Give dicts with a `label` field, or use `method='svd'`.",
    ),
    "some-labels-missing": (
        {"calibration_dataset": [{"input_ids": [5, 6], "label": 1}, {"input_ids": [8, 9]}]},
        "The sequence-classification loss needs labels, but 1 of 2 calibration examples have none (first: example "
        "1). Give dicts with a `label` field, or use `method='svd'`.",
    ),
    "label-too-large": (
        {"calibration_dataset": [{"input_ids": [5, 6], "label": 1}, {"input_ids": [8, 9], "label": 2}]},
        "Calibration example 1 has label 2, outside [0, 2) for this 2-label model. Map the labels to 0..1.",
    ),
    "label-negative": (
        {"calibration_dataset": [{"input_ids": [5, 6], "label": -1}]},
        "Calibration example 0 has label -1, outside [0, 2) for this 2-label model. Map the labels to 0..1.",
    ),
    "label-string": (
        {"calibration_dataset": [{"input_ids": [5, 6], "label": "positive"}]},
        "Calibration example 0 has label 'positive'; classification labels must be ints.",
    ),
    "mixed-dicts-and-strings": (
        {"calibration_dataset": [{"input_ids": [5, 6], "label": 1}, "a good movie"], "tokenizer": word_tokenizer()},
        "`calibration_dataset` mixes types: example 0 is a dict but example 1 is a str. Use all strings or all dicts.",
    ),
    "mixed-with-non-record": (
        {"calibration_dataset": [{"input_ids": [5, 6], "label": 1}, [5, 6]]},
        "Calibration example 1 is a list; examples must be strings or dicts.",
    ),
    "text-without-tokenizer": (
        {"calibration_dataset": [{"text": "a good movie", "label": 1}]},
        "Text calibration data needs a tokenizer: pass `tokenizer=` in FWSVDConfig.",
    ),
    "text-field-missing": (
        {"calibration_dataset": [{"review_text": "a good movie", "label": 1}], "tokenizer": word_tokenizer()},
        "Calibration example 0 has no text field (looked for text, sentence, content, review, question) and no "
        "`input_ids`; its keys are ['label', 'review_text'].",
    ),
    "text-not-a-string": (
        {"calibration_dataset": [{"text": 42, "label": 1}], "tokenizer": word_tokenizer()},
        "Calibration texts must be strings, got int: 42.",
    ),
    "empty-text": (
        {
            "calibration_dataset": [{"text": "a good movie", "label": 1}, {"text": "", "label": 0}],
            "tokenizer": word_tokenizer(),
        },
        "Calibration example 1 tokenises to no tokens; remove empty texts.",
    ),
    "token-id-outside-vocabulary": (
        {"calibration_dataset": [{"input_ids": [5, 6, 300], "label": 1}]},
        f"Calibration example 0 has token id 300, outside this model's vocabulary [0, {VOCAB}): the data was "
        "tokenised with another tokenizer. Tokenise with the model's own tokenizer.",
    ),
    "negative-token-id": (
        {"calibration_dataset": [{"input_ids": [5, -1], "label": 1}]},
        f"Calibration example 0 has token id -1, outside this model's vocabulary [0, {VOCAB}): the data was "
        "tokenised with another tokenizer. Tokenise with the model's own tokenizer.",
    ),
    "float-token-id": (
        {"calibration_dataset": [{"input_ids": [5, 6.5], "label": 1}]},
        "Calibration example 0 has a non-integer token id 6.5 in `input_ids`.",
    ),
}


@pytest.mark.parametrize("kwargs,message", list(CASES.values()), ids=list(CASES))
def test_bad_calibration_data(kwargs, message):
    model = tiny_bert()
    original = copy.deepcopy(model)
    with fails_with(ValueError, message, entry="compress (calibration)"):
        run(model, **kwargs)
    assert_untouched(model, original)


def test_texts_longer_than_the_model_are_truncated_with_a_warning(caplog):
    model = tiny_bert()  # 64 positions
    data = [{"input_ids": [3 + i % 60 for i in range(200)], "label": 1}, {"input_ids": [5, 6], "label": 0}]
    with caplog.at_level("WARNING", logger="hf_fwsvd.calibration"):
        loader = build_calibration_loader(data, None, model, max_length=512)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 64)
    expect_warning(
        caplog,
        "hf_fwsvd.calibration",
        "`max_length=512` exceeds the model's maximum of 64 positions; calibration examples are truncated to 64 "
        "tokens.",
        entry="compress (calibration)",
    )
    run(model, calibration_dataset=data, max_length=512)  # and compression works on the truncated data
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LowRankLinear)


def test_tokenizer_without_pad_token_pads_with_eos(caplog):
    model = tiny_gpt2()  # no pad_token_id in the config
    texts = ["the movie was good", "bad"]
    with caplog.at_level("WARNING", logger="hf_fwsvd.calibration"):
        batch = next(iter(build_calibration_loader(texts, word_tokenizer(pad=False, eos=True), model, batch_size=2)))
    assert batch["input_ids"][1].tolist() == [8, 2, 2, 2]  # "bad" then the eos id 2
    assert batch["labels"][1].tolist() == [8, -100, -100, -100]
    expect_warning(
        caplog,
        "hf_fwsvd.calibration",
        "The tokenizer has no pad token; padding calibration batches with its eos_token 2 (masked out by the "
        "attention mask). Set `tokenizer.pad_token` to silence this.",
        entry="compress (calibration)",
    )


def test_last_token_classifier_without_pad_token_id():
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, num_labels=2)
    config.pad_token_id = None
    model = GPT2ForSequenceClassification(config)
    data = [{"text": "the movie was good", "label": 1}, {"text": "bad", "label": 0}]
    with fails_with(
        ValueError,
        "GPT2ForSequenceClassification has no `pad_token_id` in its config, so it cannot find the last real token of "
        "a padded calibration batch. Set `model.config.pad_token_id` (e.g. to `tokenizer.eos_token_id`) or use "
        "`batch_size=1`.",
        entry="compress (calibration)",
    ):
        run(model, calibration_dataset=data, tokenizer=word_tokenizer(pad=False), batch_size=2)
    model.config.pad_token_id = 1  # the documented fix
    run(model, calibration_dataset=data, tokenizer=word_tokenizer(pad=False), batch_size=2)


def test_model_without_task_head():
    model = BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    with fails_with(
        ValueError,
        "BertModel returned no loss for the calibration batch (keys: ['attention_mask', 'input_ids']). FWSVD needs a "
        "task loss: load the model with a task head (AutoModelForSequenceClassification, ...ForCausalLM) and give "
        "labelled calibration data, pass `importances=`, or use `method='svd'`.",
        entry="compress (calibration)",
    ):
        run(model, calibration_dataset=[{"input_ids": [5, 6, 7]}])


def test_nan_loss_from_the_model():
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    original = copy.deepcopy(model)
    with fails_with(
        ValueError,
        "The calibration loss is nan on batch 0: check the labels and inputs, and estimate in float32.",
        entry="compress (calibration)",
    ):
        run(model, calibration_dataset=calibration_data("bert"))
    assert not any(isinstance(module, LowRankLinear) for module in model.modules())
    assert all(
        torch.equal(p, q) or p.isnan().any() for p, q in zip(model.parameters(), original.parameters(), strict=True)
    )


def test_nan_loss_from_a_custom_loss_on_a_later_batch():
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("inf") if len(calls) == 2 else loss

    model = tiny_bert()
    with fails_with(
        ValueError,
        "The calibration loss is inf on batch 1: check the labels and inputs, and estimate in float32.",
        entry="compress (calibration)",
    ):
        compress(
            model,
            FWSVDConfig(rank=2, calibration_dataset=calibration_data("bert"), batch_size=4),
            loss_fn=loss_fn,
            show_progress=False,
        )
    assert not any(isinstance(module, LowRankLinear) for module in model.modules())
    assert all(p.grad is None for p in model.parameters())
