"""Read task examples for the CLI from CSV / JSON / JSONL / text files or a `datasets` name, with `datasets`.

Every example comes back as a plain dict in the shape the rest of hf_fwsvd reads: ``{"text": str}`` (plus an int
``"label"`` for sequence classification), or ``{"tokens": [str], "label": [int]}`` for token classification.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["FILE_BUILDERS", "describe_source", "load_examples", "pack_texts"]

logger = logging.getLogger(__name__)

# File suffix -> the `datasets` packaged builder that reads it.
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text"}
TEXT_COLUMNS = ("text", "sentence", "content", "review", "question", "document")
LABEL_COLUMNS = ("label", "labels")
TOKEN_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("ner_tags", "tags", "labels", "label", "pos_tags")


def _load_raw(source: str, split: str | None) -> Any:
    from datasets import load_dataset, load_from_disk

    if os.path.isfile(source):
        suffix = os.path.splitext(source)[1].lower()
        builder = FILE_BUILDERS.get(suffix)
        if builder is None:
            raise ValueError(
                f"Cannot read {source!r}: unknown file type {suffix or '(no suffix)'!r}. Use one of "
                f"{', '.join(sorted(FILE_BUILDERS))}, or a `datasets` name."
            )
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        return load_dataset(builder, data_files=source, split="train", **kwargs)
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "dataset_info.json")):
        dataset = load_from_disk(source)
    elif os.path.isdir(source) and os.path.isfile(os.path.join(source, "dataset_dict.json")):
        dataset = load_from_disk(source)
    else:
        try:
            dataset = load_dataset(source, split=split)
        except FileNotFoundError as error:
            raise ValueError(
                f"Data {source!r} is neither an existing file nor a loadable `datasets` dataset ({error}). Give a "
                "CSV/JSON/JSONL/text file path or a dataset name available offline."
            ) from error
        except Exception as error:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
            raise ValueError(f"Could not load dataset {source!r}: {type(error).__name__}: {error}") from error
        return dataset
    if hasattr(dataset, "keys"):  # a DatasetDict
        if split is None:
            split = "train" if "train" in dataset else next(iter(dataset))
        if split not in dataset:
            raise ValueError(f"Dataset {source!r} has no split {split!r}; it has {', '.join(dataset)}.")
        dataset = dataset[split]
    return dataset


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{source!r} has no column {wanted!r} ({what}); its columns are {', '.join(columns)}.")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"{source!r} has no {what} column (looked for {', '.join(candidates)}); its columns are "
        f"{', '.join(columns)}. Name it with the matching --*-column option."
    )


def _label_mapper(values: list[Any], label2id: dict[str, int] | None, source: str):
    """A function turning the raw labels of a file into class ids."""
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        return int
    if label2id:
        lowered = {str(key).lower(): int(index) for key, index in label2id.items()}
        unknown = sorted({str(value) for value in values if str(value).lower() not in lowered})
        if not unknown:
            return lambda value: lowered[str(value).lower()]
    numeric = []
    for value in values:
        try:
            numeric.append(float(value))
        except (TypeError, ValueError):
            break
    if len(numeric) == len(values) and all(number.is_integer() for number in numeric):
        return lambda value: int(float(value))
    names = sorted({str(value) for value in values})
    raise ValueError(
        f"Labels in {source!r} are not class ids and do not match the model's label2id "
        f"({sorted(label2id or {})}): found {names[:8]}. Write labels as ints 0..num_labels-1 or as the model's label "
        "names."
    )


def load_examples(
    source: str,
    task: str,
    split: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    label2id: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Examples for `task` from a data file or a `datasets` dataset.

    Args:
        source (`str`): A `.csv`/`.tsv`/`.json`/`.jsonl`/`.txt` file (read with the `datasets` builders of those
            formats; a text file gives one example per line), a folder written by `Dataset.save_to_disk`, or a
            `datasets` name.
        task (`str`): `"sequence-classification"`, `"token-classification"`, `"causal-lm"` or `"masked-lm"`.
        split (`str`, *optional*): Split of a dataset dict (default `"train"`).
        text_column (`str`, *optional*): Column holding the text (tokens for token classification). Default: the
            first of `text`, `sentence`, `content`, ... that exists.
        label_column (`str`, *optional*): Column holding the label (tags for token classification).
        limit (`int`, *optional*): Keep the first `limit` examples.
        label2id (`dict[str, int]`, *optional*): Maps string labels (e.g. `"positive"`) to class ids.

    Returns:
        `list[dict]`: ``{"text": ..., "label": ...}`` dicts (``{"tokens": ..., "label": [...]}`` for token
        classification; no label for language modelling).

    Raises:
        `ValueError`: For a missing file, an unknown format, missing columns, unusable labels or no examples.
    """
    looks_like_path = os.path.splitext(source)[1].lower() in FILE_BUILDERS or source.startswith((".", os.sep, "~"))
    if looks_like_path and not os.path.exists(source):
        raise ValueError(f"Data file {source!r} does not exist.")
    dataset = _load_raw(source, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    columns = list(dataset.column_names)
    if task == "token-classification":
        tokens_column = _pick(columns, text_column, TOKEN_COLUMNS, "tokens", source)
        tags_column = _pick(columns, label_column, TAG_COLUMNS, "tags", source)
        examples = [{"tokens": list(row[tokens_column]), "label": list(row[tags_column])} for row in dataset]
    else:
        text = _pick(columns, text_column, TEXT_COLUMNS, "text", source)
        if task in ("causal-lm", "masked-lm"):
            examples = [{"text": row[text]} for row in dataset if isinstance(row[text], str) and row[text].strip()]
        else:
            label = _pick(columns, label_column, LABEL_COLUMNS, "label", source)
            values = dataset[label]
            to_id = _label_mapper(values, label2id, source)
            examples = [{"text": row[text], "label": to_id(row[label])} for row in dataset]
    if not examples:
        raise ValueError(f"{source!r} holds no usable examples for {task}.")
    logger.info("Read %d %s examples from %s", len(examples), task, source)
    return examples


def describe_source(source: str, count: int, unit: str = "examples") -> str:
    """A short human description of the data, for reports and model cards: ``"dev.csv (800 examples)"``."""
    name = os.path.basename(os.path.normpath(source)) if os.path.exists(source) else source
    if count == 1:  # "1 example", "1 block of 128 tokens"
        unit = unit.replace("examples", "example", 1).replace("blocks", "block", 1)
    return f"{name} ({count:,} {unit})"


def pack_texts(
    examples: list[dict[str, Any]], tokenizer: Any, block_length: int, max_blocks: int | None
) -> list[dict]:
    """Language-model calibration from running text: every token of the file counts, whatever its line breaks.

    The texts are joined by blank lines (as the perplexity evaluation joins them), tokenised once and cut into
    consecutive `block_length`-token blocks, so a file with one long document a line is not truncated to
    `block_length` tokens a line. The incomplete last block is dropped unless it is the only one.

    Args:
        examples (`list[dict]`): ``{"text": str}`` dicts, as `load_examples` returns them for language modelling.
        tokenizer: The model's tokenizer.
        block_length (`int`): Tokens per block (at most the model's context length).
        max_blocks (`int`, *optional*): Keep the first `max_blocks` blocks (`None` for all).

    Returns:
        `list[dict]`: ``{"input_ids": [int]}`` dicts.
    """
    ids = tokenizer("\n\n".join(example["text"] for example in examples), verbose=False)["input_ids"]
    starts = range(0, max(len(ids) - block_length + 1, 1), block_length)
    blocks = [{"input_ids": list(ids[start : start + block_length])} for start in starts]
    return blocks[:max_blocks] if max_blocks is not None else blocks
