"""Tiny saved models with word-level tokenizers and small data files, for the CLI, model card and Hub tests."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

WORDS = "the a movie film good bad great awful plot actor was is and but not very boring fun".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[SEP]", model_max_length=64
    )


def sentences(count: int, seed: int) -> list[dict]:
    """Labelled sentences: label 1 when the sentence has more positive than negative words."""
    rng = random.Random(seed)
    positive, negative = {"good", "great", "fun"}, {"bad", "awful", "boring"}
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
        score = sum(word in positive for word in words) - sum(word in negative for word in words)
        rows.append({"text": " ".join(words), "label": int(score > 0)})
    return rows


def _bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        **kwargs,
    )


def save_classifier(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    BertForSequenceClassification(_bert_config(num_labels=2)).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def save_token_classifier(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    BertForTokenClassification(_bert_config(num_labels=3)).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def save_causal_lm(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(SPECIAL) + len(WORDS), n_embd=16, n_layer=2, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tagged_sentences(count: int, seed: int) -> list[dict]:
    """Token-classification rows: tag 1 for positive words, 2 for negative ones, 0 otherwise."""
    tags = {"good": 1, "great": 1, "fun": 1, "bad": 2, "awful": 2, "boring": 2}
    return [
        {"tokens": row["text"].split(), "ner_tags": [tags.get(word, 0) for word in row["text"].split()]}
        for row in sentences(count, seed)
    ]
