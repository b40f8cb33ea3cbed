"""Model cards (README.md) for compressed checkpoints, filled from the real compression and evaluation.

The template is ``model_cards/fwsvd_model_card_template.md`` in the repository; the package ships an identical copy
as ``hf_fwsvd/templates/fwsvd_model_card_template.md`` (package data, so installed wheels have it; a test keeps the
two byte-identical). Cards are `huggingface_hub.ModelCard`s: YAML metadata (`base_model`, `library_name`, `tags`,
`pipeline_tag`, `model-index` when an evaluation was recorded) followed by Markdown.

Evaluation results reach the card through [`record_evaluation`], which stores an [`EvaluationRecord`] on the model
as ``model.fwsvd_evaluation``; compression statistics come from ``model.fwsvd_report`` (set by `compress`) or, for a
reloaded checkpoint, from its rank map and module shapes.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .calibration import infer_task
from .collapse import check_collapse
from .first_token_weight import reweighs
from .methods import get_method
from .provenance import calibration_description, hub_base_model
from .report import CompressionReport, FinetuneRecord, report_from_model
from .version import __version__

__all__ = [
    "CARD_TAGS",
    "EvaluationRecord",
    "TEMPLATE_PATH",
    "build_model_card",
    "hub_base_model",
    "is_fwsvd_card",
    "record_evaluation",
    "report_from_model",
    "write_model_card",
]

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "fwsvd_model_card_template.md"
CARD_TAGS = ["fwsvd", "low-rank", "compression"]
# hf_fwsvd task -> (Hub pipeline tag, transformers auto class).
TASKS = {
    "sequence-classification": ("text-classification", "AutoModelForSequenceClassification"),
    "token-classification": ("token-classification", "AutoModelForTokenClassification"),
    "causal-lm": ("text-generation", "AutoModelForCausalLM"),
    "masked-lm": ("fill-mask", "AutoModelForMaskedLM"),
    "question-answering": ("question-answering", "AutoModelForQuestionAnswering"),
}
_COUNT_KEYS = {"num_examples", "num_tokens", "parameters"}


@dataclass
class EvaluationRecord:
    """Task metrics of the dense and the compressed model on one dataset, for the model card.

    Args:
        dataset (`str`): What was evaluated on, as people should read it (e.g. ``"polarity dev.csv (800 examples)"``).
        after (`dict[str, float]`): Metrics of the compressed model, e.g. ``{"accuracy": 0.79}``.
        before (`dict[str, float]`, *optional*): The same metrics for the dense model.
        dataset_type (`str`, *optional*): Dataset id for the `model-index` metadata (default: derived from `dataset`).
        split (`str`, *optional*): Dataset split.
        collapse (`str`, *optional*): The collapse guard's warning (see `hf_fwsvd.collapse`), when it fired.
    """

    dataset: str
    after: dict[str, float]
    before: dict[str, float] | None = None
    dataset_type: str | None = None
    split: str | None = None
    collapse: str | None = None

    def metric_names(self) -> list[str]:
        return [name for name, value in self.after.items() if name not in _COUNT_KEYS and _is_number(value)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_evaluation(
    model: Any,
    after: dict[str, float],
    dataset: str,
    before: dict[str, float] | None = None,
    **kwargs: Any,
) -> EvaluationRecord:
    """Attach evaluation results to `model` so the next `save_pretrained` / `push_to_hub` puts them in its card.

    The collapse guard (`hf_fwsvd.collapse.check_collapse`) checks the metrics: when the compression wrecked the model
    (perplexity above 3x the dense one, accuracy at chance) it logs a warning naming what to try, and the warning is
    stored as `record.collapse` and printed in the card.

    Args:
        model: The compressed model.
        after (`dict[str, float]`): Metrics of the compressed model.
        dataset (`str`): Human description of the evaluation data.
        before (`dict[str, float]`, *optional*): Metrics of the dense model on the same data.
        kwargs: `dataset_type`, `split` (see [`EvaluationRecord`]).
    """
    if not any(_is_number(value) for key, value in after.items() if key not in _COUNT_KEYS):
        raise ValueError(f"`after` holds no numeric metric: {after!r}.")
    record = EvaluationRecord(dataset=dataset, after=dict(after), before=None if before is None else dict(before))
    for key, value in kwargs.items():
        if not hasattr(record, key):
            raise TypeError(f"record_evaluation() got an unexpected keyword argument {key!r}.")
        setattr(record, key, value)
    task = infer_task(model)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    classifier = task in ("sequence-classification", "token-classification")
    report = getattr(model, "fwsvd_report", None)
    method = getattr(report, "method", None)
    record.collapse = check_collapse(record.before, record.after, num_labels if classifier else None, method=method)
    if record.collapse:
        logger.warning(record.collapse)
    model.fwsvd_evaluation = record
    return record


def _rank_setting(config: Any, sink_modules: list[str] | None = None) -> str:
    if getattr(config, "rank", None) is not None:
        text = f"`rank={config.rank}` (the same rank for every module)"
    elif getattr(config, "param_ratio", None) is not None:
        text = f"`param_ratio={config.param_ratio}` (each module keeps about {config.param_ratio:.0%} of its weights)"
    elif getattr(config, "param_budget", None) is not None:
        unit = "weight bytes" if getattr(config, "budget_unit", "params") == "bytes" else "weights"
        text = (
            f"`param_budget={config.param_budget}` ({config.param_budget:.0%} of the targeted modules' {unit} kept in "
            f"total, allocation `{config.allocation}`"
            + (f" with `allocation_power={config.allocation_power:g}`)" if config.allocation == "fisher" else ")")
        )
        if getattr(config, "sink_threshold", None) is not None:
            count = len(sink_modules or [])
            text += (
                f"; `sink_threshold={config.sink_threshold:g}`: {count} attention-sink module{'s' * (count != 1)} "
                "kept dense"
            )
    elif getattr(config, "rank_ratio", None) is not None:
        text = f"`rank_ratio={config.rank_ratio}` (each module keeps {config.rank_ratio:.0%} of its full rank)"
    else:
        text = "explicit rank map"
    pattern = getattr(config, "rank_pattern", None)
    if pattern:
        text += f", overrides `rank_pattern={pattern}`"
    return text


def _format_metric(value: Any) -> str:
    if not _is_number(value):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


def _evaluation_context(record: EvaluationRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    rows = [
        {
            "name": name,
            "before": _format_metric((record.before or {}).get(name)),
            "after": _format_metric(record.after[name]),
        }
        for name in record.metric_names()
    ]
    split = f", split `{record.split}`" if record.split else ""
    how = (
        "Perplexity measured by hf_fwsvd (`evaluate_perplexity`: the texts joined by blank lines, the exp of the mean "
        "token loss over non-overlapping windows)"
        if "perplexity" in record.metric_names()
        else "Measured with `evaluate`"
    )
    return {
        "description": f"{how} on {record.dataset}{split}.",
        "rows": rows,
        "collapse": record.collapse,
    }


def _eval_results(record: EvaluationRecord | None, pipeline_tag: str | None) -> list[EvalResult] | None:
    if record is None or pipeline_tag is None:
        return None
    dataset_type = record.dataset_type or re.sub(r"[^\w.-]+", "-", record.dataset.split(" (")[0]).strip("-")
    return [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=dataset_type or "custom",
            dataset_name=record.dataset,
            dataset_split=record.split,
            metric_type=name,
            metric_value=float(record.after[name]),
        )
        for name in record.metric_names()
    ]


def _shown_load_path(load_path: str | os.PathLike | None) -> str:
    """The folder or Hub id for the loading snippet; an absolute local path is cut to its last part."""
    if not load_path:
        return "path/to/this/checkpoint"
    load_path = os.fspath(load_path)
    return os.path.basename(os.path.normpath(load_path)) if os.path.isabs(load_path) else load_path


def _finetune_row(record: FinetuneRecord) -> str:
    if record.by == "unrecorded":
        return (
            "The weights were trained after compression outside `hf_fwsvd.finetune` (e.g. with a `transformers` "
            "`Trainer` or a merged LoRA adapter); the run's settings were not recorded."
        )
    parts = [f"with `{record.by}`"]
    if record.data:
        parts.append(f"on {record.data}")
    elif record.examples:
        parts.append(f"on {record.examples:,} examples")
    settings = [record.objective] if record.objective else []
    if record.epochs is not None:
        settings.append(f"{record.epochs:g} epochs")
    if record.steps is not None:
        settings.append(f"{record.steps:,} steps")
    if record.learning_rate is not None:
        settings.append(f"learning rate {record.learning_rate:g}")
    if record.train_loss is not None and record.train_loss == record.train_loss:
        settings.append(f"mean training loss {record.train_loss:.4f}")
    text = "Fine-tuned after compression " + " ".join(parts)
    return text + (f" ({', '.join(settings)})." if settings else ".")


def _method_options(config: Any) -> str:
    """What the card's method row adds to the method's name: the options that change its statistics."""
    weight = getattr(config, "first_token_weight", None)
    if not reweighs(weight):
        return ""
    return (
        f"; `first_token_weight={weight:g}`: each calibration sequence's first token weighted {weight:g} in the "
        "gradient-weighted moments"
    )


def _calibration_text(method: Any, report: CompressionReport) -> str:
    """The card's calibration row, from the method's registry entry: what its data was used for."""
    if not method.needs_data:
        return f"none ({method.short_title} uses no data)"
    calibration = report.calibration_data or "not recorded in this checkpoint"
    if report.calibration_samples:
        calibration += f"; {report.calibration_samples:,} examples used for {method.calibration_use or 'calibration'}"
    return calibration


def build_model_card(
    model: Any, load_path: str | None = None, tags: list[str] | None = None, model_name: str | None = None
) -> ModelCard:
    """The model card of a compressed model.

    Args:
        model: A compressed model (compressed in this process, or reloaded from an FWSVD checkpoint).
        load_path (`str`, *optional*): The Hub id or folder to show in the loading snippet.
        tags (`list[str]`, *optional*): Extra tags besides `fwsvd`, `low-rank`, `compression`.
        model_name (`str`, *optional*): Title of the card (default: the last part of `load_path`, or the base model
            name plus ``-fwsvd``).

    Raises:
        `ValueError`: When `model` is not FWSVD-compressed.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if getattr(config, "quant_method", None) != "fwsvd" or not getattr(config, "ranks", None):
        raise ValueError(f"{type(model).__name__} is not FWSVD-compressed; there is no compression to describe.")
    report = getattr(model, "fwsvd_report", None) or report_from_model(model)
    base_model = getattr(config, "base_model", None) or report.base_model
    task = infer_task(model)
    pipeline_tag, auto_class = TASKS.get(task, (None, "AutoModel"))
    base_name = os.path.basename(os.path.normpath(base_model)) if base_model else type(model).__name__
    model_name = model_name or (os.path.basename(os.path.normpath(load_path)) if load_path else f"{base_name}-fwsvd")
    record = getattr(model, "fwsvd_evaluation", None)
    card_data = ModelCardData(
        base_model=hub_base_model(base_model),
        library_name="transformers",
        tags=CARD_TAGS + [tag for tag in tags or [] if tag not in CARD_TAGS],
        pipeline_tag=pipeline_tag,
        model_name=model_name,
        eval_results=_eval_results(record, pipeline_tag),
    )
    if hub_base_model(base_model):
        description = f"A low-rank compressed version of [{base_model}](https://huggingface.co/{base_model})."
    else:
        # Never a local path (it means nothing to readers and leaks the author's file system).
        description = (
            f"A low-rank compressed {type(model).__name__}, compressed from a local checkpoint (pass "
            '`FWSVDConfig(base_model="org/name")` to link the dense model on the Hub).'
        )
    method = get_method(report.method)
    report = copy.copy(report)
    report.calibration_data = calibration_description(model, report)
    calibration = _calibration_text(method, report)
    module_before = sum(row.params_before for row in report.modules)
    module_after = sum(row.params_after for row in report.modules)
    context = {
        "model_name": model_name,
        "description": description,
        "hf_fwsvd_version": getattr(config, "hf_fwsvd_version", __version__),
        "method": report.method,
        "method_name": method.title,
        "method_references": method.references,
        "method_options": _method_options(config),
        "rank_setting": _rank_setting(config, report.sink_modules),
        "num_modules": len(report.modules),
        "params_before": report.model_params_before,
        "params_after": report.model_params_after,
        "params_ratio": report.params_ratio,
        "module_params_before": module_before,
        "module_params_after": module_after,
        "module_params_ratio": module_after / max(module_before, 1),
        "factor_storage": report.factor_storage,
        "module_bytes_before": report.module_bytes_before,
        "module_bytes_after": report.module_bytes_after,
        "module_bytes_ratio": report.module_bytes_after / max(report.module_bytes_before, 1),
        "calibration": calibration,
        "evaluation": _evaluation_context(record),
        "auto_class": auto_class,
        "load_path": _shown_load_path(load_path),
        "warnings": list(report.warnings),
        "finetuning": [_finetune_row(record) for record in report.finetuning],
        "modules": [
            {
                "name": row.name,
                "shape": f"{row.out_features} x {row.in_features}",
                "rank": row.rank,
                "params_before": row.params_before,
                "params_after": row.params_after,
                "plain_error": "n/a" if row.plain_error != row.plain_error else f"{row.plain_error:.4f}",
                "weighted_error": "n/a" if row.weighted_error != row.weighted_error else f"{row.weighted_error:.4f}",
            }
            for row in report.modules
        ],
    }
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **context)


def is_fwsvd_card(path: str | os.PathLike) -> bool:
    """Whether the `README.md` at `path` is a card hf_fwsvd wrote (its metadata carries the `fwsvd` tag)."""
    try:
        return "fwsvd" in (ModelCard.load(path).data.tags or [])
    except Exception:  # an unparsable README is the user's, not ours
        return False


def write_model_card(model: Any, directory: str | os.PathLike, load_path: str | None = None, **kwargs: Any) -> None:
    """Write `README.md` for a compressed model into `directory` (a `save_atomically` extra writer).

    Args:
        model: The compressed model.
        directory (`str` or `os.PathLike`): Checkpoint folder.
        load_path (`str`, *optional*): Hub id or folder shown in the loading snippet.
        kwargs: Passed to [`build_model_card`] (`tags`, `model_name`).
    """
    card = build_model_card(model, load_path=load_path, **kwargs)
    card.save(os.path.join(os.fspath(directory), "README.md"))
