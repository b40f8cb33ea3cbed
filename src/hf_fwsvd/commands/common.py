"""What the CLI commands share: the error type with its exit code, model/tokenizer loading, task evaluation."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "TASKS",
    "CommandError",
    "add_data_arguments",
    "check_hub_reachable",
    "check_output_path",
    "count_parameters",
    "add_metric_argument",
    "check_metrics",
    "evaluate_task",
    "load_model",
    "load_tokenizer",
    "read_examples",
]

logger = logging.getLogger(__name__)

EXIT_FAILURE = 1  # the command ran and failed (bad data, a model that cannot be compressed, ...)
EXIT_USAGE = 2  # the command line is wrong (argparse uses 2 too): nothing was run
TASKS = ("sequence-classification", "token-classification", "causal-lm", "masked-lm")
EVALUATED_TASKS = ("sequence-classification", "token-classification", "causal-lm")
AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
}


class CommandError(Exception):
    """An error the CLI prints as ``hf-fwsvd <command>: error: <message>`` before exiting with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_data_arguments(parser: Any, prefix: str = "", required: bool = True) -> None:
    """`--data`, `--split`, `--text-column`, `--label-column` (optionally prefixed, e.g. `--eval-data`)."""
    dest = prefix.replace("-", "_")
    what = "evaluation" if prefix else "calibration"
    parser.add_argument(
        f"--{prefix}data",
        required=required,
        metavar="FILE_OR_DATASET",
        help=f"{what.capitalize()} data: a .csv/.tsv/.json/.jsonl/.txt file, a saved `datasets` folder or a "
        "`datasets` name (classification: text and label columns).",
    )
    parser.add_argument(f"--{prefix}split", dest=f"{dest}split", metavar="NAME", help="Split of a dataset dict.")
    parser.add_argument(
        f"--{prefix}text-column", dest=f"{dest}text_column", metavar="COL", help="Text column (default: text)."
    )
    parser.add_argument(
        f"--{prefix}label-column", dest=f"{dest}label_column", metavar="COL", help="Label column (default: label)."
    )


def check_input_path(source: str, what: str) -> None:
    """Fail early (exit code 2) on a path-looking argument that does not exist."""
    if source.startswith((".", os.sep, "~")) and not os.path.exists(source):
        raise CommandError(f"{what} {source!r} does not exist.", EXIT_USAGE)


def check_output_path(output: str, inputs: list[str], option: str, overwrite: bool) -> None:
    """Fail before any work (exit code 2) when `output` cannot be written: a file, a non-empty folder without
    `overwrite`, one of the `inputs`, the working directory (or a folder holding it), or not writable."""
    real = os.path.realpath(output)
    if os.path.isfile(output):
        raise CommandError(f"{option} {output!r} is a file; give a folder.", EXIT_USAGE)
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise CommandError(
            f"{option} {output!r} already exists and is not empty; pass --overwrite to replace the checkpoint in it, "
            "or choose another folder.",
            EXIT_USAGE,
        )
    for source in inputs:
        if os.path.exists(source) and os.path.realpath(source) == real:
            raise CommandError(
                f"{option} {output!r} is the input checkpoint {source!r}; writing there would destroy it. Choose "
                "another folder.",
                EXIT_USAGE,
            )
    cwd = os.path.realpath(os.getcwd())
    if os.path.isdir(output) and (cwd == real or cwd.startswith(real + os.sep)):
        raise CommandError(
            f"{option} {output!r} is the current directory (or holds it), which the save replaces as a whole. Run "
            "the command from another directory.",
            EXIT_USAGE,
        )
    existing = real
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    writable = os.access(existing, os.W_OK) and (existing == real or os.access(existing, os.X_OK))
    parent = os.path.dirname(real)
    if not writable or (os.path.isdir(real) and os.path.isdir(parent) and not os.access(parent, os.W_OK)):
        blocked = existing if not writable else parent
        raise CommandError(
            f"{option} {output!r} cannot be written: {blocked!r} is not writable. Choose a writable folder.",
            EXIT_USAGE,
        )


def check_hub_reachable(repo_id: str) -> None:
    """Fail before any work (exit code 2) when `--push-to-hub` cannot reach the Hub (offline mode or no network)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise CommandError(
            f"--push-to-hub {repo_id!r}: HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset it, or drop "
            "--push-to-hub.",
            EXIT_USAGE,
        )
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError as error:
        raise CommandError(
            f"--push-to-hub {repo_id!r}: cannot reach {constants.ENDPOINT} ({error.strerror or error}). Check the "
            "network (or HF_ENDPOINT), or drop --push-to-hub and upload the folder later with `huggingface-cli "
            "upload`.",
            EXIT_USAGE,
        ) from error


def load_model(model_id: str, task: str, num_labels: int | None = None) -> Any:
    """Load `model_id` (a folder or Hub id, dense or FWSVD-compressed) with the auto class of `task`."""
    import transformers

    check_input_path(model_id, "Model")
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    try:
        return auto.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as error:
        raise CommandError(f"Cannot load {model_id!r} as a {task} model: {error}") from error


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CommandError(
            f"Cannot load a tokenizer from {source!r}: {error}. Pass --tokenizer with a folder that has one."
        ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_examples(args: argparse.Namespace, model: Any, prefix: str = "", limit: int | None = None) -> list[dict]:
    """The examples named by `--<prefix>data` (and its split/column options) for `args.task`."""
    from ..data_files import load_examples

    dest = prefix.replace("-", "_")
    source = getattr(args, f"{dest}data")
    check_input_path(source, "Data")
    label2id = getattr(getattr(model, "config", None), "label2id", None)
    try:
        return load_examples(
            source,
            args.task,
            split=getattr(args, f"{dest}split"),
            text_column=getattr(args, f"{dest}text_column"),
            label_column=getattr(args, f"{dest}label_column"),
            limit=limit,
            label2id=label2id,
        )
    except ValueError as error:
        raise CommandError(str(error)) from error


# A causal LM's calibration text is cut into blocks of this many tokens, and this many tokens are read in all, unless
# --max-length / --num-samples say otherwise (64 blocks of 512). On SmolLM2-135M (`kfac_svdllm`, the same calibration
# tokens cut into 128-, 256- and 512-token passages), with the CLI's 32,768 tokens, the development perplexity was
# 38.55 / 37.61 / 37.06 at 80% kept and 90.23 / 87.13 / 84.09 at 60%; 512 also won at both budgets on a 131,072-token
# genre mix and lost only with 8,192 tokens at 60% (benchmarks/README.md, "Passage starts, and the largest mix").
CAUSAL_CALIBRATION_BLOCK = 512
CAUSAL_CALIBRATION_TOKENS = 32_768


def resolve_calibration_size(args: argparse.Namespace) -> None:
    """Fill in `--max-length` and `--num-samples` left unset, in place: for a causal LM blocks of
    `CAUSAL_CALIBRATION_BLOCK` tokens and as many as make `CAUSAL_CALIBRATION_TOKENS`; for other tasks
    `FWSVDConfig`'s defaults (128 tokens, 256 examples)."""
    from ..config import FWSVDConfig

    fields = FWSVDConfig.__dataclass_fields__
    causal = args.task == "causal-lm"
    if args.max_length is None:
        args.max_length = CAUSAL_CALIBRATION_BLOCK if causal else fields["max_length"].default
    if args.num_samples is None:
        args.num_samples = (
            max(1, CAUSAL_CALIBRATION_TOKENS // args.max_length) if causal else fields["num_samples"].default
        )


def pack_causal_calibration(args: argparse.Namespace, examples: list[dict], tokenizer: Any, model: Any) -> list[dict]:
    """A causal LM calibrates on its text file cut into `--max-length`-token blocks (see `pack_texts`), capped by the
    model's context length, so a one-document-a-line corpus is not cut to one truncated example a line."""
    from ..data_files import pack_texts

    block = args.max_length or CAUSAL_CALIBRATION_BLOCK
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(context, int) and context < block:
        logger.info("Calibration blocks of %d tokens, the model's context length (not --max-length %d).", context,
                    block)  # fmt: skip
        block = context
    return pack_texts(examples, tokenizer, block, max_blocks=None)


def count_parameters(model: Any) -> int:
    return sum(param.numel() for param in model.parameters())


def add_metric_argument(parser: Any) -> None:
    """`--metric NAME_OR_PATH` (repeatable): which `evaluate` metrics to compute for classification tasks."""
    from ..evaluation import available_metrics

    parser.add_argument(
        "--metric",
        action="append",
        dest="metrics",
        metavar="NAME_OR_PATH",
        help=f"Classification metric, repeatable: one of the shipped {', '.join(available_metrics())} or the path "
        "of a local `evaluate` metric script (default: accuracy and f1; token classification: accuracy).",
    )


def check_metrics(metrics: list[str] | None, task: str) -> None:
    """Usage errors for `--metric`: not with causal LMs (perplexity), and a path that does not exist."""
    from ..evaluation import available_metrics

    if not metrics:
        return
    if task not in ("sequence-classification", "token-classification"):
        raise CommandError(
            f"--metric applies to classification tasks; --task {task} is measured by perplexity.", EXIT_USAGE
        )
    for name in metrics:
        if name not in available_metrics() and not os.path.exists(os.path.expanduser(name)):
            raise CommandError(
                f"--metric {name!r} is neither a shipped metric ({', '.join(available_metrics())}) nor an existing "
                "metric script path.",
                EXIT_USAGE,
            )


@torch.no_grad()
def _token_accuracy(
    model: Any, tokenizer: Any, examples: list[dict], batch_size: int, max_length: int, metrics: Any = ("accuracy",)
) -> dict:
    """Metrics (default: accuracy) over labelled words (first sub-token of each word)."""
    from ..evaluation import compute_metrics

    model.eval()
    predictions, references = [], []
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoding = tokenizer(
            [example["tokens"] for example in chunk],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        predicted = model(**encoding.to(device)).logits.argmax(-1).tolist()
        for row, example in enumerate(chunk):
            previous = None
            for position, word in enumerate(encoding.word_ids(row)):
                if word is not None and word != previous:
                    predictions.append(predicted[row][position])
                    references.append(int(example["label"][word]))
                previous = word
    num_labels = getattr(model.config, "num_labels", None) or len(set(references) | set(predictions))
    result = compute_metrics(metrics, predictions, references, num_labels)
    return {**result, "num_examples": len(examples), "num_tokens": len(references)}


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: str,
    examples: list[dict],
    batch_size: int = 32,
    max_length: int = 128,
    window: int = 512,
    max_tokens: int | None = None,
    metrics: list[str] | None = None,
) -> dict[str, float]:
    """The task metric(s) of `model` on `examples`, plus its parameter count.

    Sequence classification: `metrics` (default accuracy and F1, `evaluate` modules shipped with hf_fwsvd); token
    classification: word-level `metrics` (default accuracy); causal LM: perplexity over the texts joined by blank
    lines.
    """
    from ..evaluation import evaluate_classifier, evaluate_perplexity

    if task == "sequence-classification":
        chosen = {"metrics": metrics} if metrics else {}
        result = evaluate_classifier(
            model, tokenizer, examples, batch_size=batch_size, max_length=max_length, **chosen
        )
    elif task == "token-classification":
        result = _token_accuracy(model, tokenizer, examples, batch_size, max_length, metrics or ("accuracy",))
    elif task == "causal-lm":
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        window = min(window, limit) if isinstance(limit, int) and limit > 1 else window
        text = "\n\n".join(example["text"] for example in examples)
        perplexity = evaluate_perplexity(model, tokenizer, text, window=window, max_tokens=max_tokens)
        result = {"perplexity": perplexity, "num_examples": len(examples)}
    else:
        raise CommandError(f"Evaluation supports --task {', '.join(EVALUATED_TASKS)}; got {task}.", EXIT_USAGE)
    result["parameters"] = count_parameters(model)
    return result


def main_metric(result: dict[str, float], metrics: list[str] | None = None) -> tuple[str, float]:
    """The headline metric of an `evaluate_task` result: the first chosen metric, else accuracy, or perplexity."""
    from ..evaluation import available_metrics

    first = (metrics or [None])[0]
    if first in available_metrics() and first in result:
        return first, result[first]
    for name in ("accuracy", "perplexity"):
        if name in result:
            return name, result[name]
    for name, value in result.items():
        if name not in ("parameters", "num_examples", "num_tokens"):
            return name, value
    raise KeyError(f"No headline metric in {sorted(result)}")
