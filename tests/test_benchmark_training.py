"""The benchmarks' shared fine-tuning loop (`benchmarks.task_model.train_classifier`), on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import sentences, tiny_bert, tiny_tokenizer

from benchmarks.task_model import train_classifier
from hf_fwsvd import FWSVDConfig, LowRankLinear, compress


def _examples(count: int = 12) -> list[dict]:
    return [{"text": text, "label": k % 2} for k, text in enumerate(sentences(count))]


def test_max_steps_cycles_over_the_data_and_counts_examples():
    torch.manual_seed(0)
    model = tiny_bert()
    # 12 examples in batches of 5 -> 3 batches (5, 5, 2) per epoch; 7 steps = two full epochs + one batch.
    stats = train_classifier(model, tiny_tokenizer(), _examples(), max_steps=7, batch_size=5, max_length=16)
    assert stats["steps"] == 7
    assert stats["examples"] in {12 + 12 + 5, 12 + 12 + 2}
    assert not model.training


def test_same_seed_same_result_and_embeddings_frozen_on_a_compressed_model():
    torch.manual_seed(0)
    dense = tiny_bert()
    compress(dense, FWSVDConfig(rank=4, method="svd"), show_progress=False)
    twins = [copy.deepcopy(dense), copy.deepcopy(dense)]
    for model in twins:
        torch.manual_seed(1)  # dropout masks
        train_classifier(model, tiny_tokenizer(), _examples(), max_steps=3, batch_size=4, max_length=16, seed=3)
    first, second = (dict(model.named_parameters()) for model in twins)
    for name, param in first.items():
        assert torch.equal(param, second[name]), name
    before = dict(dense.named_parameters())
    layer = "bert.encoder.layer.0.attention.self.query"
    assert isinstance(twins[0].get_submodule(layer), LowRankLinear)
    assert not torch.equal(first[f"{layer}.down.weight"], before[f"{layer}.down.weight"])
    assert not torch.equal(first[f"{layer}.up.weight"], before[f"{layer}.up.weight"])
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(first[embeddings], before[embeddings])


def test_zero_steps_is_refused():
    with pytest.raises(ValueError, match="positive number of steps, got 0"):
        train_classifier(tiny_bert(), tiny_tokenizer(), _examples(), max_steps=0)
