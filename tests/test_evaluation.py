"""Tests of hf_fwsvd.evaluation and the shipped metric modules, on tiny models built inline (nothing downloaded)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from hf_fwsvd.evaluation import (
    METRICS_DIR,
    available_metrics,
    evaluate_classifier,
    evaluate_perplexity,
    load_metric,
)

WORDS = "the a movie film good bad great awful plot actor was is and but not very boring fun".split()
PREDICTIONS = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0]
REFERENCES = [0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def _texts(n: int, seed: int) -> list[str]:
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 15, (n,), generator=rng).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=rng).tolist()) for k in lengths]


def test_shipped_metrics_are_found():
    assert {"accuracy", "f1", "matthews_correlation"} <= set(available_metrics())
    for name in available_metrics():
        assert (METRICS_DIR / name / f"{name}.py").is_file()


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("accuracy", {}, accuracy_score(REFERENCES, PREDICTIONS)),
        ("accuracy", {"normalize": False}, accuracy_score(REFERENCES, PREDICTIONS, normalize=False)),
        ("f1", {}, f1_score(REFERENCES, PREDICTIONS)),
        ("f1", {"pos_label": 0}, f1_score(REFERENCES, PREDICTIONS, pos_label=0)),
        ("f1", {"average": "macro"}, f1_score(REFERENCES, PREDICTIONS, average="macro")),
        ("matthews_correlation", {}, matthews_corrcoef(REFERENCES, PREDICTIONS)),
    ],
    ids=["accuracy", "accuracy-count", "f1-binary", "f1-pos0", "f1-macro", "mcc"],
)
def test_metric_matches_sklearn(name, kwargs, expected):
    result = load_metric(name).compute(predictions=PREDICTIONS, references=REFERENCES, **kwargs)
    assert set(result) == {name}
    assert isinstance(result[name], float)
    assert result[name] == pytest.approx(float(expected))


def test_f1_per_label_returns_array():
    preds, refs = [0, 2, 1, 0, 0, 1], [0, 1, 2, 0, 1, 2]
    result = load_metric("f1").compute(predictions=preds, references=refs, average=None)
    assert result["f1"].tolist() == pytest.approx(f1_score(refs, preds, average=None).tolist())


def test_metrics_load_without_hub():
    """Fresh interpreters load every shipped metric with the Hub offline flags set, and with them unset.

    The two interpreters run concurrently to keep the test fast.
    """
    code = (
        "from hf_fwsvd.evaluation import available_metrics, load_metric\n"
        "for n in available_metrics():\n"
        "    print(n, load_metric(n).compute(predictions=[0, 1, 1], references=[0, 1, 0]))\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    base["PYTHONPATH"] = os.pathsep.join([src, base.get("PYTHONPATH", "")])
    envs = {"offline": {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, "unset": base}
    procs = {
        name: subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, env in envs.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {stderr.decode()}"
        assert "accuracy {'accuracy': 0.6666666666666666}" in stdout.decode(), name
        assert "f1 {'f1': 0.6666666666666666}" in stdout.decode(), name


def _tiny_causal_lm(arch: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return (tiny_llama if arch == "llama" else tiny_gpt2)(vocab_size=vocab_size)


def _brute_force_perplexity(model, ids: list[int], window: int) -> float:
    """exp(mean NLL of every token given the tokens before it in its own window), one token at a time."""
    nlls = []
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start : start + window]])
        logprobs = torch.log_softmax(model(input_ids=chunk).logits[0].double(), dim=-1)
        for pos in range(1, chunk.shape[1]):
            nlls.append(-logprobs[pos - 1, chunk[0, pos]].item())
    return math.exp(sum(nlls) / len(nlls))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "window, max_tokens", [(8, None), (16, 30), (64, None), (7, 29)], ids=["w8", "w16-max30", "w64-one", "w7-max29"]
)
def test_perplexity_matches_brute_force(tokenizer, arch, window, max_tokens):
    model = _tiny_causal_lm(arch, len(tokenizer))
    model.train()  # evaluate_perplexity must switch to eval mode and back
    text = " ".join(_texts(6, seed=1))
    ids = tokenizer(text).input_ids
    assert len(ids) > 30
    expected = _brute_force_perplexity(model.eval(), ids[:max_tokens] if max_tokens else ids, window)
    model.train()
    ppl = evaluate_perplexity(model, tokenizer, text, window=window, max_tokens=max_tokens)
    assert ppl == pytest.approx(expected, rel=1e-5)
    assert model.training


def test_perplexity_rejects_too_short_text(tokenizer):
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_perplexity(_tiny_causal_lm("gpt2", len(tokenizer)), tokenizer, "good")


def test_classifier_matches_hand_computation(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a large head so that the random model does not predict one class only
        model.classifier.weight.normal_(std=5.0)
    texts = _texts(37, seed=2)
    labels = [i % 2 for i in range(len(texts))]
    examples = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]

    model.eval()
    with torch.no_grad():
        preds = [model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1).item() for t in texts]
    assert 0 < sum(preds) < len(preds), "degenerate tiny model: pick another seed"

    model.train()
    result = evaluate_classifier(model, tokenizer, examples, batch_size=8)
    assert model.training
    assert result["num_examples"] == len(texts)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert result["f1"] == pytest.approx(f1_score(labels, preds))
