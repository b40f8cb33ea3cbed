"""Task metrics for compressed models: classification accuracy/F1 and causal-LM perplexity.

Metrics go through `evaluate`, using the metric modules shipped in ``hf_fwsvd/metrics/<name>/<name>.py`` so that
nothing has to be fetched from the Hugging Face Hub.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import evaluate
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METRICS",
    "METRICS_DIR",
    "available_metrics",
    "compute_metrics",
    "evaluate_classifier",
    "evaluate_perplexity",
    "length_sorted_batches",
    "load_metric",
]

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
DEFAULT_METRICS = ("accuracy", "f1")
_AVERAGED = {"f1", "precision", "recall"}  # metrics that take `average=` ("binary" for 2 labels, else "macro")


def available_metrics() -> list[str]:
    """Names of the metric modules shipped with hf-fwsvd (loadable without network access)."""
    return sorted(p.parent.name for p in METRICS_DIR.glob("*/*.py") if p.stem == p.parent.name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Loads an `evaluate` metric, preferring the copy shipped with hf-fwsvd.

    Args:
        name (`str`): Metric name, e.g. ``"accuracy"``, ``"f1"`` or ``"matthews_correlation"``, or the path of a
            local `evaluate` metric script (a ``.py`` file, or a folder holding ``<folder name>.py``). Other names
            are passed to ``evaluate.load(name)``, which needs the Hub.
        **kwargs: Passed to `evaluate.load` (e.g. ``config_name="multilabel"``, ``keep_in_memory=True``).

    Returns:
        `evaluate.EvaluationModule`: The loaded metric.

    Raises:
        `FileNotFoundError`: When `name` looks like a path (ends in ``.py`` or contains a separator) and is missing.
    """
    script = METRICS_DIR / name / f"{name}.py"
    if script.is_file():
        return evaluate.load(str(script), **kwargs)
    local = Path(name).expanduser()
    if local.is_file() or local.is_dir():
        return evaluate.load(str(local), **kwargs)
    if name.endswith(".py") or "/" in name or "\\" in name:
        raise FileNotFoundError(
            f"Metric script {name!r} does not exist. Give one of the shipped metrics "
            f"({', '.join(available_metrics())}) or the path of an `evaluate` metric script."
        )
    logger.warning(
        "Metric %r is not shipped with hf-fwsvd (have %s); loading it from the Hub", name, available_metrics()
    )
    return evaluate.load(name, **kwargs)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def compute_metrics(
    metrics: Sequence[str], predictions: list[int], references: list[int], num_labels: int
) -> dict[str, float]:
    """Compute each metric in `metrics` (shipped names or local script paths, see [`load_metric`]) on class ids.

    ``f1``, ``precision`` and ``recall`` are binary (positive class 1) for two labels and macro-averaged otherwise.
    The numeric values each metric returns are merged into one dict (``{"accuracy": ..., "f1": ...}``).
    """
    result: dict[str, float] = {}
    for name in metrics:
        module = load_metric(name)
        kwargs = {"average": "binary" if num_labels <= 2 else "macro"} if module.name in _AVERAGED else {}
        values = module.compute(predictions=predictions, references=references, **kwargs)
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                result[key] = float(value)
    return result


def length_sorted_batches(
    tokenizer, examples: Sequence[dict], batch_size: int, max_length: int
) -> Iterator[tuple[list[int], dict]]:
    """Tokenised batches of `examples` sorted by text length, so each pads only to its own longest text.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer.
        examples (`Sequence[dict]`): Items with a ``"text"`` field.
        batch_size (`int`): Examples per batch.
        max_length (`int`): Texts are truncated to this many tokens.

    Yields:
        `(indices, batch)`: the positions in `examples` of the batch's rows, and the tokenizer's PyTorch batch.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["text"]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        texts = [examples[i]["text"] for i in idx]
        yield idx, tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    tokenizer,
    examples: list[dict],
    batch_size: int = 64,
    max_length: int = 64,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict:
    """Task metrics (by default accuracy and F1) of a sequence classifier on labelled texts.

    Examples are batched in order of length (padding only to the longest in each batch) for speed; the result does
    not depend on that order.

    Args:
        model (`torch.nn.Module`): A sequence-classification model returning ``.logits`` of shape
            ``(batch, num_labels)``. Put in eval mode for the call; its previous mode is restored afterwards.
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer.
        examples (`list[dict]`): Items ``{"text": str, "label": int}``.
        batch_size (`int`, *optional*, defaults to 64): Examples per forward pass.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.
        metrics (`Sequence[str]`, *optional*, defaults to ``("accuracy", "f1")``): Shipped metric names
            (`available_metrics()`: accuracy, f1, matthews_correlation) or paths of local `evaluate` metric scripts.

    Returns:
        `dict`: ``{"accuracy": float, "f1": float, "num_examples": int}`` for the default metrics. F1 is binary
        (positive class 1) for two labels and macro-averaged otherwise.
    """
    if not examples:
        raise ValueError("evaluate_classifier needs at least one example")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    predictions = [0] * len(examples)
    batches = length_sorted_batches(tokenizer, examples, batch_size, max_length)
    try:
        total = math.ceil(len(examples) / batch_size)
        for idx, batch in tqdm(batches, total=total, desc="Evaluating", unit="batch"):
            logits = model(**batch.to(device)).logits
            for i, pred in zip(idx, logits.argmax(dim=-1).tolist(), strict=True):
                predictions[i] = pred
    finally:
        model.train(was_training)

    references = [int(e["label"]) for e in examples]
    num_labels = getattr(getattr(model, "config", None), "num_labels", None) or len(set(references) | set(predictions))
    return {**compute_metrics(metrics, predictions, references, num_labels), "num_examples": len(examples)}


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    window: int = 512,
    max_tokens: int | None = None,
) -> float:
    """Perplexity of a causal language model on a text, over non-overlapping windows.

    The text is tokenized once (with the tokenizer's default special tokens), cut to ``max_tokens`` and split into
    consecutive windows of ``window`` tokens. Each window is scored with ``labels=input_ids`` (the model shifts the
    labels itself, so a window of n tokens scores n - 1 predictions) and the result is
    ``exp(total NLL / number of predicted tokens)`` over all windows. Tokens are not scored across window borders.

    Args:
        model (`torch.nn.Module`): A causal LM whose forward accepts ``labels`` and returns the mean ``.loss``.
            Put in eval mode for the call; its previous mode is restored afterwards.
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer.
        text (`str`): The text to score.
        window (`int`, *optional*, defaults to 512): Tokens per forward pass.
        max_tokens (`int`, *optional*): Score only the first ``max_tokens`` tokens.

    Returns:
        `float`: The perplexity.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    starts = [s for s in range(0, len(ids), window) if len(ids) - s >= 2]
    if not starts:
        raise ValueError(f"The text has {len(ids)} token(s); at least 2 are needed to measure perplexity")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    total_nll, total_count = 0.0, 0
    try:
        for start in tqdm(starts, desc="Perplexity", unit="window"):
            chunk = ids[start : start + window].unsqueeze(0).to(device)
            loss = model(input_ids=chunk, labels=chunk).loss
            count = chunk.shape[1] - 1
            total_nll += loss.double().item() * count
            total_count += count
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_count)
