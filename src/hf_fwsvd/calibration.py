"""Turn the user's calibration data into batches that make a model return its task loss."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

__all__ = [
    "LimitedLoader",
    "build_calibration_loader",
    "calibration_loader_from_config",
    "calibration_token_count",
    "infer_task",
    "tokenize_examples",
]

logger = logging.getLogger(__name__)

TEXT_KEYS = ("text", "sentence", "content", "review", "question")
SOURCE_KEYS = (*TEXT_KEYS, "document", "source")  # seq2seq inputs (summarisation datasets call them `document`)
LABEL_KEYS = ("labels", "label")
TARGET_KEYS = ("target", "summary", "translation", "labels")
TASKS = (
    "sequence-classification",
    "token-classification",
    "causal-lm",
    "masked-lm",
    "question-answering",
    "seq2seq",
    "image-classification",
)


def infer_task(model: Any) -> str | None:
    """The loss a model computes from its class name: ``"causal-lm"``, ``"sequence-classification"``, ..."""
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "causal-lm"),
        ("LMHeadModel", "causal-lm"),
        ("ForSequenceClassification", "sequence-classification"),
        ("ForTokenClassification", "token-classification"),
        ("ForMaskedLM", "masked-lm"),
        ("ForQuestionAnswering", "question-answering"),
        ("ForConditionalGeneration", "seq2seq"),
        ("ForImageClassification", "image-classification"),
    ):
        if name.endswith(suffix):
            return task
    return None


def _as_records(data: Any, num_samples: int | None = None) -> list[Any]:
    """The first `num_samples` records of `data`, read lazily: a generator or a streaming (`Iterable`) dataset is
    consumed only up to `num_samples`, never to its end."""
    if isinstance(data, (str, bytes)) or isinstance(data, Mapping):
        raise ValueError(
            "`calibration_dataset` must be a list of strings, a list of dicts, a `datasets.Dataset` or a DataLoader, "
            f"got a single {type(data).__name__}."
        )
    if not isinstance(data, Iterable):
        raise ValueError(f"`calibration_dataset` of type {type(data).__name__} is not iterable.")
    if num_samples is None:
        if not hasattr(data, "__len__"):
            logger.warning(
                "`calibration_dataset` is a %s without a length and `num_samples=None`: it is read to its end (an "
                "endless stream never returns). Set `num_samples` to read only that many examples.",
                type(data).__name__,
            )
        return list(data)
    return list(itertools.islice(data, num_samples))


def _text_of(record: Mapping[str, Any], keys: tuple[str, ...] = TEXT_KEYS) -> str | None:
    for key in keys:
        if key in record:
            return record[key]
    return None


def _label_of(record: Mapping[str, Any]) -> Any:
    for key in LABEL_KEYS:
        if key in record:
            return record[key]
    return None


def _encode(tokenizer: Any, text: str, max_length: int) -> list[int]:
    if tokenizer is None:
        raise ValueError("Text calibration data needs a tokenizer: pass `tokenizer=` in FWSVDConfig.")
    if not isinstance(text, str):
        raise ValueError(f"Calibration texts must be strings, got {type(text).__name__}: {text!r:.60}.")
    return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]


def _pad_id(tokenizer: Any, model_config: Any) -> int:
    """The id used to pad batches: the model's own `pad_token_id` when it has one (sequence classifiers that pool the
    last token find it by this id), else the tokenizer's pad, eos or unk token, else 0. Padded positions are masked
    out by the attention mask and the labels, so the choice only matters to models that look for the pad id."""
    model_pad = getattr(model_config, "pad_token_id", None)
    tokenizer_pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if isinstance(model_pad, int):
        return model_pad
    if tokenizer_pad is not None:
        return int(tokenizer_pad)
    for attribute in ("eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attribute, None) if tokenizer is not None else None
        if value is not None:
            logger.warning(
                "The tokenizer has no pad token; padding calibration batches with its %s %d (masked out by the "
                "attention mask). Set `tokenizer.pad_token` to silence this.",
                attribute.removesuffix("_id"),
                value,
            )
            return int(value)
    if tokenizer is not None:
        logger.warning(
            "Neither the tokenizer nor the model config has a pad, eos or unk token; padding calibration batches with "
            "id 0 (masked out by the attention mask)."
        )
    return 0


def _check_types(records: list[Any]) -> None:
    kinds = [
        "text" if isinstance(record, str) else "dict" if isinstance(record, Mapping) else "other" for record in records
    ]
    if "other" in kinds:
        index = kinds.index("other")
        raise ValueError(
            f"Calibration example {index} is a {type(records[index]).__name__}; examples must be strings or dicts."
        )
    if len(set(kinds)) > 1:
        index = kinds.index("dict" if kinds[0] == "text" else "text")
        raise ValueError(
            f"`calibration_dataset` mixes types: example 0 is a {type(records[0]).__name__} but example {index} is a "
            f"{type(records[index]).__name__}. Use all strings or all dicts."
        )


def _check_token_ids(examples: list[dict[str, Any]], model_config: Any) -> None:
    vocab_size = getattr(model_config, "vocab_size", None)
    for index, example in enumerate(examples):
        ids = example["input_ids"]
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in ids):
            bad = next(token for token in ids if not isinstance(token, int) or isinstance(token, bool))
            raise ValueError(f"Calibration example {index} has a non-integer token id {bad!r} in `input_ids`.")
        if isinstance(vocab_size, int) and ids and not 0 <= min(ids) <= max(ids) < vocab_size:
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ValueError(
                f"Calibration example {index} has token id {bad}, outside this model's vocabulary [0, {vocab_size}): "
                "the data was tokenised with another tokenizer. Tokenise with the model's own tokenizer."
            )


def _check_padding(examples: list[dict[str, Any]], task: str | None, model: Any, batch_size: int) -> None:
    config = getattr(model, "config", None)
    if task != "sequence-classification" or batch_size == 1 or getattr(config, "pad_token_id", 0) is not None:
        return
    if len({len(example["input_ids"]) for example in examples}) > 1:
        raise ValueError(
            f"{type(model).__name__} has no `pad_token_id` in its config, so it cannot find the last real token of a "
            "padded calibration batch. Set `model.config.pad_token_id` (e.g. to `tokenizer.eos_token_id`) or use "
            "`batch_size=1`."
        )


class _Collator:
    """Right- or left-pads token ids and builds labels for the task loss."""

    def __init__(self, task: str | None, pad_id: int, padding_side: str, float_labels: bool) -> None:
        self.task, self.pad_id, self.padding_side, self.float_labels = task, pad_id, padding_side, float_labels

    def _pad(self, rows: list[list[Any]], value: Any) -> list[list[Any]]:
        width = max(len(row) for row in rows)
        if self.padding_side == "left":
            return [[value] * (width - len(row)) + list(row) for row in rows]
        return [list(row) + [value] * (width - len(row)) for row in rows]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "pixel_values" in examples[0]:
            batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])}
            if "labels" in examples[0]:
                batch["labels"] = torch.tensor([example["labels"] for example in examples])
            return batch
        ids = [example["input_ids"] for example in examples]
        batch = {
            "input_ids": torch.tensor(self._pad(ids, self.pad_id)),
            "attention_mask": torch.tensor(self._pad([[1] * len(row) for row in ids], 0)),
        }
        if self.task == "causal-lm" and "labels" in examples[0]:  # the user's labels, with their -100 masking
            batch["labels"] = torch.tensor(self._pad([example["labels"] for example in examples], -100))
        elif self.task == "causal-lm":
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        elif self.task in ("token-classification", "seq2seq"):
            if self.task == "seq2seq":  # targets are right-padded whatever the tokenizer's side
                width = max(len(example["labels"]) for example in examples)
                rows = [list(e["labels"]) + [-100] * (width - len(e["labels"])) for e in examples]
            else:
                rows = self._pad([example["labels"] for example in examples], -100)
            batch["labels"] = torch.tensor(rows)
        elif "labels" in examples[0]:
            dtype = torch.float32 if self.float_labels else torch.long
            batch["labels"] = torch.tensor([example["labels"] for example in examples], dtype=dtype)
        return batch


def _token_list(value: Any) -> list[Any]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _target_of(record: Mapping[str, Any], tokenizer: Any, max_length: int, index: int) -> list[int] | None:
    """Token ids of a seq2seq example's target: `labels` ids as given, or a `target`/`summary`/`translation` text."""
    for key in TARGET_KEYS:
        if key not in record:
            continue
        value = record[key]
        if isinstance(
            value, Mapping
        ):  # a `translation` column: {"en": ..., "fr": ...}; the last language is the target
            value = list(value.values())[-1] if value else None
        if isinstance(value, str):
            if tokenizer is None:
                raise ValueError("Text calibration data needs a tokenizer: pass `tokenizer=` in FWSVDConfig.")
            return tokenizer(text_target=value, truncation=True, max_length=max_length)["input_ids"]
        if value is not None and not isinstance(value, (int, float)):
            return _token_list(value)[:max_length]
        raise ValueError(
            f"Calibration example {index} has `{key}` = {value!r:.60}; a seq2seq target must be a text or a list of "
            "token ids."
        )
    return None


def _tokenize_record(record: Any, tokenizer: Any, max_length: int, task: str | None, index: int) -> dict[str, Any]:
    if isinstance(record, str):
        return {"input_ids": _encode(tokenizer, record, max_length)}
    if not isinstance(record, Mapping):
        raise ValueError(
            f"Calibration example {index} is a {type(record).__name__}; mix of types is not supported: use all "
            "strings or all dicts."
        )
    if "pixel_values" in record:
        label = _label_of(record)
        return {"pixel_values": record["pixel_values"]} | ({} if label is None else {"labels": label})
    if task == "seq2seq":
        text = _text_of(record, SOURCE_KEYS)
        if "input_ids" in record:
            source = _token_list(record["input_ids"])[:max_length]
        elif text is not None:
            source = _encode(tokenizer, text, max_length)
        else:
            raise ValueError(
                f"Calibration example {index} has no text field (looked for {', '.join(SOURCE_KEYS)}) and no "
                f"`input_ids`; its keys are {sorted(record)}."
            )
        target = _target_of(record, tokenizer, max_length, index)
        return {"input_ids": source} | ({} if target is None else {"labels": target})
    label = _label_of(record)
    if "input_ids" in record:
        ids = record["input_ids"]
        example = {"input_ids": (ids.tolist() if hasattr(ids, "tolist") else list(ids))[:max_length]}
    elif task == "token-classification" and "tokens" in record:
        encoding = tokenizer(record["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        previous, aligned = None, []
        for word in encoding.word_ids():
            aligned.append(-100 if word is None or word == previous else int(label[word]))
            previous = word
        return {"input_ids": encoding["input_ids"], "labels": aligned}
    else:
        text = _text_of(record)
        if text is None:
            raise ValueError(
                f"Calibration example {index} has no text field (looked for {', '.join(TEXT_KEYS)}) and no "
                f"`input_ids`; its keys are {sorted(record)}."
            )
        example = {"input_ids": _encode(tokenizer, text, max_length)}
    if task == "causal-lm":  # only per-token `labels` (e.g. with -100 masking) replace the input ids as targets
        label = record.get("labels")
        if label is not None and not isinstance(label, (str, bytes, int, float)):
            example["labels"] = _token_list(label)[:max_length]
    elif label is not None:
        example["labels"] = _token_list(label)[:max_length] if task == "token-classification" else label
    return example


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_token_labels(examples: list[dict[str, Any]], task: str, model_config: Any) -> None:
    """Per-token labels: one per input id, ints, in ``[0, num_labels)`` or -100 (ignored)."""
    num_labels = getattr(model_config, "num_labels", None) if task == "token-classification" else None
    vocab_size = getattr(model_config, "vocab_size", None) if task == "causal-lm" else None
    bound = num_labels if isinstance(num_labels, int) else vocab_size if isinstance(vocab_size, int) else None
    for i, example in enumerate(examples):
        if "labels" not in example:
            continue
        labels, ids = example["labels"], example["input_ids"]
        if len(labels) != len(ids):
            raise ValueError(
                f"Calibration example {i} has {len(labels)} labels for {len(ids)} tokens; {task} labels need one per "
                "token id (-100 where the loss should ignore it). Align the labels with the tokenised input (e.g. "
                "with `word_ids()`), or give `tokens` and word labels and let hf_fwsvd align them."
            )
        bad = next(
            (
                label
                for label in labels
                if not _is_int(label) or not (label == -100 or bound is None or 0 <= label < bound)
            ),
            None,
        )
        if bad is not None:
            what = f"[0, {bound})" if bound is not None else "ints"
            raise ValueError(
                f"Calibration example {i} has label {bad!r}; {task} labels must be in {what} or -100 (ignored)."
            )
        example["labels"] = [int(label) for label in labels]


def _check_labels(examples: list[dict[str, Any]], task: str | None, model_config: Any) -> bool:
    """Validate labels for the task; returns whether labels are float (regression, multi-label)."""
    if task in ("causal-lm", "token-classification"):
        _check_token_labels(examples, task, model_config)
    if task in (None, "causal-lm", "masked-lm"):
        return False
    missing = [i for i, example in enumerate(examples) if "labels" not in example]
    if missing:
        if task == "seq2seq":
            raise ValueError(
                f"The seq2seq loss needs target texts, but {len(missing)} of {len(examples)} calibration examples "
                f"have none (first: example {missing[0]}). Give dicts with a text and a `target` (or `summary`, "
                "`translation`, `labels`) field, or use `method='svd'`."
            )
        raise ValueError(
            f"The {task} loss needs labels, but {len(missing)} of {len(examples)} calibration examples have none "
            f"(first: example {missing[0]}). Give dicts with a `label` field, or use `method='svd'`."
        )
    if task not in ("sequence-classification", "image-classification"):
        return False
    num_labels = getattr(model_config, "num_labels", None)
    problem = getattr(model_config, "problem_type", None)
    if problem == "multi_label_classification":
        for i, example in enumerate(examples):
            label = example["labels"]
            values = _token_list(label) if not isinstance(label, (str, bytes, int, float)) else None
            if values is None or len(values) != num_labels or not all(_is_number(v) and 0 <= v <= 1 for v in values):
                raise ValueError(
                    f"Calibration example {i} has label {label!r:.60}; this multi-label model needs a multi-hot list "
                    f"of {num_labels} numbers in [0, 1] per example (1.0 for each label that applies)."
                )
            example["labels"] = [float(value) for value in values]
        return True
    if problem == "regression" or num_labels == 1:
        for i, example in enumerate(examples):
            label = example["labels"]
            if not _is_number(label):
                raise ValueError(
                    f"Calibration example {i} has label {label!r:.60} ({type(label).__name__}); regression labels "
                    "must be numbers. Convert them (e.g. `float(label)`)."
                )
        return True
    for i, example in enumerate(examples):
        label = example["labels"]
        if not _is_int(label):
            hint = (
                " For multi-label data set `model.config.problem_type = 'multi_label_classification'` and give "
                "multi-hot lists."
                if not isinstance(label, (str, bytes, int, float))
                else ""
            )
            raise ValueError(f"Calibration example {i} has label {label!r}; classification labels must be ints.{hint}")
        if num_labels is not None and not 0 <= int(label) < num_labels:
            raise ValueError(
                f"Calibration example {i} has label {label!r}, outside [0, {num_labels}) for this "
                f"{num_labels}-label model. Map the labels to 0..{num_labels - 1}."
            )
        example["labels"] = int(label)
    return False


def _batch_rows(batch: Any) -> int | None:
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for value in values:
        if torch.is_tensor(value) and value.ndim >= 1:
            return int(value.shape[0])
    return None


def _head(batch: Any, rows: int) -> Any:
    """The first `rows` examples of a batch (tensors with a leading batch dimension are sliced)."""

    def cut(value: Any) -> Any:
        return value[:rows] if torch.is_tensor(value) and value.ndim >= 1 else value

    if isinstance(batch, Mapping):
        return {key: cut(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(value) for value in batch)
    return cut(batch)


class LimitedLoader:
    """A user's `DataLoader`, read up to `num_samples` examples (the last batch is cut to fit), with `BatchEncoding`
    batches (what `DataCollatorWithPadding` yields) turned into plain dicts. Iterable any number of times.

    Args:
        loader (`DataLoader`): The calibration batches.
        num_samples (`int`, *optional*): Stop after this many examples (`None`: the whole loader).
    """

    def __init__(self, loader: DataLoader, num_samples: int | None) -> None:
        self.loader, self.num_samples = loader, num_samples
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __len__(self) -> int:
        limit = -(-self.num_samples // self.batch_size) if self.num_samples and self.batch_size else None
        try:
            batches = len(self.loader)
        except TypeError:  # a loader over an IterableDataset
            if limit is None:
                raise
            return limit
        return batches if limit is None else min(batches, limit)

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        for batch in self.loader:
            if isinstance(batch, Mapping) and not isinstance(batch, dict):
                batch = dict(batch)
            if self.num_samples is not None:
                rows = _batch_rows(batch)
                if rows is not None and seen + rows > self.num_samples:
                    batch, rows = _head(batch, self.num_samples - seen), self.num_samples - seen
                seen += rows if rows is not None else 1
            yield batch
            if self.num_samples is not None and seen >= self.num_samples:
                logger.info("Read the first %d calibration examples of the DataLoader (`num_samples`).", seen)
                return


def build_calibration_loader(
    data: Any,
    tokenizer: Any = None,
    model: Any = None,
    num_samples: int | None = 256,
    batch_size: int = 8,
    max_length: int = 128,
) -> DataLoader | LimitedLoader:
    """Batches of model inputs (with `labels` where the task needs them) from the calibration data.

    Args:
        data: A `DataLoader` (read up to `num_samples` examples, see [`LimitedLoader`]), a list of strings, a list of
            dicts, a `datasets.Dataset`, or any iterable of those (read lazily up to `num_samples`).
        tokenizer: Tokenizer for text data.
        model: The model; its class decides the task and how labels are built.
        num_samples (`int`, *optional*): Use the first `num_samples` examples (all when `None`).
        batch_size (`int`): Batch size.
        max_length (`int`): Token truncation length.

    Raises:
        `ValueError`: For missing or empty data, missing labels, labels out of range or mixed example types.
    """
    if data is None:
        raise ValueError(
            "FWSVD needs calibration data to estimate Fisher importances: pass `calibration_dataset=` (and "
            "`tokenizer=`) or precomputed `importances=` in FWSVDConfig, or use `method='svd'`."
        )
    if isinstance(data, DataLoader):
        return LimitedLoader(data, num_samples)
    examples, collate = tokenize_examples(data, tokenizer, model, num_samples, max_length, batch_size)
    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate)


def tokenize_examples(
    data: Any,
    tokenizer: Any = None,
    model: Any = None,
    num_samples: int | None = None,
    max_length: int = 128,
    batch_size: int = 8,
) -> tuple[list[dict[str, Any]], Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]]:
    """Tokenised examples and a collate function building the model's task-loss batches (also used by `finetune`).

    Same arguments and errors as [`build_calibration_loader`] (without the batching).
    """
    records = _as_records(data, num_samples)
    if not records:
        raise ValueError("`calibration_dataset` is empty: FWSVD needs at least one calibration example.")
    _check_types(records)
    task = infer_task(model)
    model_config = getattr(model, "config", None)
    model_max = getattr(model_config, "max_position_embeddings", None)
    length = max_length
    if isinstance(model_max, int) and 0 < model_max < max_length:
        logger.warning(
            "`max_length=%d` exceeds the model's maximum of %d positions; calibration examples are truncated to %d "
            "tokens.",
            max_length,
            model_max,
            model_max,
        )
        length = model_max
    examples = [_tokenize_record(record, tokenizer, length, task, i) for i, record in enumerate(records)]
    text = [example for example in examples if "pixel_values" not in example]
    empty = [i for i, example in enumerate(text) if not example["input_ids"]]
    if empty:
        raise ValueError(f"Calibration example {empty[0]} tokenises to no tokens; remove empty texts.")
    _check_token_ids(text, model_config)
    float_labels = _check_labels(examples, task, model_config)
    _check_padding(examples, task, model, batch_size)
    padding_side = getattr(tokenizer, "padding_side", "right") if tokenizer is not None else "right"
    return examples, _Collator(task, _pad_id(tokenizer, model_config), padding_side, float_labels)


def calibration_loader_from_config(config: Any, model: Any) -> DataLoader | Iterable[dict[str, Any]]:
    """[`build_calibration_loader`] with the calibration settings of an [`FWSVDConfig`]."""
    return build_calibration_loader(
        config.calibration_dataset,
        config.tokenizer,
        model,
        num_samples=config.num_samples,
        batch_size=config.batch_size,
        max_length=config.max_length,
    )


def calibration_token_count(config: Any, model: Any) -> int:
    """The real tokens of `config`'s calibration batches: `attention_mask` ones, or every input id without a mask."""
    total = 0
    for batch in calibration_loader_from_config(config, model):
        mask = batch.get("attention_mask")
        total += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return total
