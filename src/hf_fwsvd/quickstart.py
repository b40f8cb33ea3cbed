"""A self-contained demo for the README quickstart: a small sentiment classifier built and trained in seconds.

Nothing is downloaded: the vocabulary, the tokenizer (a word-level `tokenizers` model wrapped in
`PreTrainedTokenizerFast`), the labelled sentences and the BERT classifier are all made here, so the quickstart
runs right after ``pip install hf-fwsvd`` on a machine without network access. With your own model, use its folder
or Hub id and your labelled examples instead of [`demo_classifier`].

Run ``python -m hf_fwsvd.quickstart`` for the whole quickstart (build, compress, save, reload, classify).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch

__all__ = ["demo_classifier", "demo_sentences"]

logger = logging.getLogger(__name__)

POSITIVE = "good great fun superb moving clever charming funny brilliant lovely".split()
NEGATIVE = "bad awful boring dull weak silly clumsy tedious bland messy".split()
NEUTRAL = "the a film movie plot story actor cast script scene music and was is very quite but with".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def demo_sentences(count: int, seed: int) -> list[dict]:
    """Labelled sentences: label 1 when a sentence has more positive than negative words (ties are skipped)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < count:
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 8))]
        words += [rng.choice(POSITIVE) for _ in range(rng.randint(0, 3))]
        words += [rng.choice(NEGATIVE) for _ in range(rng.randint(0, 3))]
        rng.shuffle(words)
        score = sum(word in POSITIVE for word in words) - sum(word in NEGATIVE for word in words)
        if score:
            rows.append({"text": " ".join(words), "label": int(score > 0)})
    return rows


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=128,
    )


def demo_classifier(
    directory: str | os.PathLike = "demo-bert", seed: int = 0, steps: int = 150
) -> tuple[str, list[dict], list[dict]]:
    """Build, train and save a small BERT sentiment classifier (2 layers, hidden size 64) with its tokenizer.

    Args:
        directory (`str` or `os.PathLike`, *optional*, defaults to ``"demo-bert"``): Where to save it; a folder that
            already holds the model is reused without retraining.
        seed (`int`, *optional*, defaults to 0): Seed of the data and the training run.
        steps (`int`, *optional*, defaults to 150): Training steps (batches of 32 sentences).

    Returns:
        `tuple`: ``(path, train, test)``: the saved folder, 512 training and 200 test sentences
        (``{"text": str, "label": int}``).
    """
    from transformers import BertConfig, BertForSequenceClassification

    train, test = demo_sentences(512, seed), demo_sentences(200, seed + 1)
    path = Path(directory)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return str(path), train, test
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        pad_token_id=0,
    )
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(train, 32)
        inputs = tokenizer([row["text"] for row in batch], padding=True, return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([row["label"] for row in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    logger.info("Trained the demo classifier for %d steps (last loss %.4f) and saved it to %s.", steps, loss, path)
    return str(path), train, test


def main() -> None:
    """The README quickstart, end to end."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from .config import FWSVDConfig
    from .evaluation import evaluate_classifier

    path, train, test = demo_classifier("demo-bert")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = FWSVDConfig(rank_ratio=0.25, calibration_dataset=train, tokenizer=tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(path, fwsvd_config=config)
    model.save_pretrained("demo-bert-fwsvd")
    dense = AutoModelForSequenceClassification.from_pretrained(path)
    print(f"{model.fwsvd_report.params_ratio:.1%} of parameters kept")
    print("accuracy dense", evaluate_classifier(dense, tokenizer, test)["accuracy"])
    print("accuracy fwsvd", evaluate_classifier(model, tokenizer, test)["accuracy"])
    print(pipeline("text-classification", model="demo-bert-fwsvd")("a clever and moving film"))


if __name__ == "__main__":
    main()
