"""Reliability: odd but legitimate inputs work (seq2seq targets, multi-label, BatchEncoding batches, images), and
the wrong ones fail before any work with one message that says what to do."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_data, tiny_bert
from reliability_cases import fails_with, word_tokenizer
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorWithPadding,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress, compute_importances
from hf_fwsvd.calibration import build_calibration_loader


def unchanged(model) -> bool:
    return not any(isinstance(module, LowRankLinear) for module in model.modules())


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def test_seq2seq_calibration_with_text_and_target_columns():
    texts = ["the movie was good", "a plot was bad", "great acting", "awful long plot"]
    # two target words: with a one-token target the decoder's first self-attention sees one key, so its `q` has no
    # gradient (softmax over one score is constant) and FWSVD would rightly refuse it as all-zero importance
    records = [{"text": text, "summary": " ".join(text.split()[-2:])} for text in texts]
    batch = next(iter(build_calibration_loader(records, word_tokenizer(), tiny_t5(), batch_size=4)))
    assert batch["labels"].shape == (4, 2) and (batch["labels"] >= 0).all()
    model = compress(tiny_t5(), FWSVDConfig(rank=4, calibration_dataset=records, tokenizer=word_tokenizer()),
                     show_progress=False)  # fmt: skip
    assert not unchanged(model)


def test_seq2seq_ragged_label_ids_are_padded_with_minus_100():
    records = [{"input_ids": [5, 6, 7], "labels": [8, 9]}, {"input_ids": [5], "labels": [4, 5, 6, 7]}]
    batch = next(iter(build_calibration_loader(records, model=tiny_t5(), batch_size=2)))
    assert batch["labels"].tolist() == [[8, 9, -100, -100], [4, 5, 6, 7]]


def test_seq2seq_without_targets():
    model = tiny_t5()
    message = (
        "The seq2seq loss needs target texts, but 2 of 2 calibration examples have none (first: example 0). Give "
        "dicts with a text and a `target` (or `summary`, `translation`, `labels`) field, or use `method='svd'`."
    )
    with fails_with(ValueError, message, entry="compress"):
        config = FWSVDConfig(rank=4, calibration_dataset=["the movie", "a plot"], tokenizer=word_tokenizer())
        compress(model, config, show_progress=False)
    assert unchanged(model)


def test_int8_weight_linear_is_refused():
    model = tiny_bert()
    query = model.bert.encoder.layer[0].attention.self.query
    query.weight = torch.nn.Parameter(torch.ones(16, 16, dtype=torch.int8), requires_grad=False)
    message = (
        "`bert.encoder.layer.0.attention.self.query` has int8 weights (a quantized layer); FWSVD factorises "
        "floating-point weights. Load the model unquantized (float32, float16 or bfloat16), or exclude the module "
        "with `modules_to_not_convert`."
    )
    with fails_with(ValueError, message, entry="compress"):
        compress(model, FWSVDConfig(rank=4, method="svd"), show_progress=False)
    assert unchanged(model)


def tiny_tagger(num_labels: int = 3):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)  # fmt: skip
    return BertForTokenClassification(config)


TOKEN_LABELS = {
    "too-short": (
        [0, 1],
        "Calibration example 0 has 2 labels for 4 tokens; token-classification labels need one per token id (-100 "
        "where the loss should ignore it). Align the labels with the tokenised input (e.g. with `word_ids()`), or "
        "give `tokens` and word labels and let hf_fwsvd align them.",
    ),
    "out-of-range": (
        [0, 1, 7, -100],
        "Calibration example 0 has label 7; token-classification labels must be in [0, 3) or -100 (ignored).",
    ),
    "negative": (
        [0, 1, -1, 2],
        "Calibration example 0 has label -1; token-classification labels must be in [0, 3) or -100 (ignored).",
    ),
    "not-int": (
        [0, 1, "B-PER", 2],
        "Calibration example 0 has label 'B-PER'; token-classification labels must be in [0, 3) or -100 (ignored).",
    ),
}


@pytest.mark.parametrize(("labels", "message"), TOKEN_LABELS.values(), ids=TOKEN_LABELS.keys())
def test_bad_token_classification_labels(labels, message):
    model = tiny_tagger()
    config = FWSVDConfig(rank=4, calibration_dataset=[{"input_ids": [5, 6, 7, 8], "labels": labels}])
    with fails_with(ValueError, message, entry="compress"):
        compress(model, config, show_progress=False)
    assert unchanged(model)


def bert_classifier(**kwargs):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, **kwargs)  # fmt: skip
    return BertForSequenceClassification(config)


def multi_label_bert():
    return bert_classifier(num_labels=3, problem_type="multi_label_classification")


def test_multi_label_classification_calibrates():
    records = [{"input_ids": [5, 6, 7], "label": [1.0, 0.0, 1.0]}, {"input_ids": [8, 9], "label": [0, 1, 0]}]
    batch = next(iter(build_calibration_loader(records, model=multi_label_bert(), batch_size=2)))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[1, 0, 1], [0, 1, 0]]
    model = compress(multi_label_bert(), FWSVDConfig(rank=4, calibration_dataset=records), show_progress=False)
    assert not unchanged(model)


@pytest.mark.parametrize("label", [[1.0, 0.0], 2, [0.0, 2.0, 1.0]], ids=["wrong-width", "class-id", "not-multi-hot"])
def test_bad_multi_label_labels(label):
    message = (
        f"Calibration example 0 has label {label!r:.60}; this multi-label model needs a multi-hot list of 3 numbers "
        "in [0, 1] per example (1.0 for each label that applies)."
    )
    with fails_with(ValueError, message, entry="compress"):
        build_calibration_loader([{"input_ids": [5, 6], "label": label}], model=multi_label_bert())


def test_list_labels_on_a_single_label_model_point_to_multi_label():
    message = (
        "Calibration example 0 has label [1, 0]; classification labels must be ints. For multi-label data set "
        "`model.config.problem_type = 'multi_label_classification'` and give multi-hot lists."
    )
    with fails_with(ValueError, message, entry="compress"):
        build_calibration_loader([{"input_ids": [5, 6], "label": [1, 0]}], model=tiny_bert())


@pytest.mark.parametrize("label", ["3.5", "high", True], ids=["numeric-string", "word", "bool"])
def test_regression_labels_must_be_numbers(label):
    model = bert_classifier(num_labels=1)
    message = (
        f"Calibration example 0 has label {label!r:.60} ({type(label).__name__}); regression labels must be numbers. "
        "Convert them (e.g. `float(label)`)."
    )
    with fails_with(ValueError, message, entry="compress"):
        build_calibration_loader([{"input_ids": [5, 6], "label": label}], model=model)


def test_dataloader_of_tuples_is_refused_with_the_fix():
    loader = DataLoader(TensorDataset(torch.randint(3, 60, (4, 5)), torch.tensor([0, 1, 0, 1])), batch_size=2)
    model = tiny_bert()
    message = (
        "A calibration batch is a list, not a dict of model inputs (a DataLoader over a TensorDataset yields "
        "tuples). Yield dicts such as {'input_ids': ..., 'attention_mask': ..., 'labels': ...} (e.g. with a "
        "`collate_fn`), or pass `loss_fn(model, batch)` that unpacks your batches."
    )
    with fails_with(ValueError, message, entry="compress"):
        compress(model, FWSVDConfig(rank=4, calibration_dataset=loader), show_progress=False)
    assert unchanged(model)


def test_dataloader_of_tuples_works_with_a_loss_fn():
    loader = DataLoader(TensorDataset(torch.randint(3, 60, (4, 5)), torch.tensor([0, 1, 0, 1])), batch_size=2)

    def loss_fn(model, batch):
        ids, labels = batch
        return model(input_ids=ids, labels=labels).loss

    model = compress(tiny_bert(), FWSVDConfig(rank=4, calibration_dataset=loader), loss_fn=loss_fn,
                     show_progress=False)  # fmt: skip
    assert not unchanged(model)


def test_batch_encoding_batches_from_data_collator_with_padding():
    """`DataCollatorWithPadding` yields `BatchEncoding`s (not dicts); they were rejected although the README
    promises DataLoaders. The Fisher equals the one of the same examples given as records."""
    tokenizer = word_tokenizer()
    texts = ["the movie was good", "a bad plot", "great acting was long", "awful"]
    features = [dict(tokenizer(text), labels=index % 2) for index, text in enumerate(texts)]
    loader = DataLoader(features, batch_size=2, collate_fn=DataCollatorWithPadding(tokenizer))
    assert type(next(iter(loader))).__name__ == "BatchEncoding"
    records = [{"text": text, "label": index % 2} for index, text in enumerate(texts)]
    torch.manual_seed(0)
    model = tiny_bert(vocab_size=16)
    result = compute_importances(model, FWSVDConfig(rank=4, calibration_dataset=loader), show_progress=False)
    reference = compute_importances(
        model, FWSVDConfig(rank=4, calibration_dataset=records, tokenizer=tokenizer, batch_size=2), show_progress=False
    )
    for name in reference:
        torch.testing.assert_close(result[name], reference[name])


def test_compress_inside_inference_mode():
    model = tiny_bert()
    message = (
        "Fisher importances need gradients, but this runs inside `torch.inference_mode()`, where none can be "
        "computed. Call compress (or compute_importances) outside the inference_mode block."
    )
    with fails_with(RuntimeError, message, entry="compress"), torch.inference_mode():
        compress(model, FWSVDConfig(rank=4, calibration_dataset=calibration_data("bert")), show_progress=False)
    assert unchanged(model)


def test_importances_cache_that_is_a_directory(tmp_path):
    message = (
        f"`importances_cache` {str(tmp_path)!r} is a directory; it must be a file path, e.g. "
        f"{str(tmp_path / 'importances.safetensors')!r}."
    )
    with fails_with(ValueError, message, entry="FWSVDConfig", replacements={str(tmp_path): "<tmp>"}):
        FWSVDConfig(rank=4, calibration_dataset=calibration_data("bert"), importances_cache=tmp_path)


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_labels=3)  # fmt: skip
    return ViTForImageClassification(config)


def images(count: int, label=lambda index: index % 3):
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 8, 8, generator=generator), "label": label(i)} for i in range(count)]


def test_vision_model_calibrates_on_pixel_values_and_labels():
    model = compress(tiny_vit(), FWSVDConfig(rank=4, calibration_dataset=images(6), batch_size=3),
                     show_progress=False)  # fmt: skip
    assert isinstance(model.vit.layers[0].attention.q_proj, LowRankLinear)


def test_vision_label_out_of_range():
    model = tiny_vit()
    message = "Calibration example 1 has label 5, outside [0, 3) for this 3-label model. Map the labels to 0..2."
    with fails_with(ValueError, message, entry="compress"):
        config = FWSVDConfig(rank=4, calibration_dataset=images(2, label=lambda i: 5 * i))
        compress(model, config, show_progress=False)
    assert unchanged(model)
