"""What a compressed checkpoint records about its own history, kept up to date at every save.

- ``fwsvd_report.json``: the [`CompressionReport`] (per-module ranks and errors, calibration data, fine-tunes,
  warnings), written next to the weights by `save_pretrained` and read back into ``model.fwsvd_report`` by
  `from_pretrained`, so a reloaded model describes itself as well as the one that was compressed.
- Fine-tuning: `hf_fwsvd.finetune` records its runs; weights that changed after compression without it (a
  `transformers.Trainer` run, a merged LoRA adapter) are detected at the next save with [`weights_fingerprint`] and
  recorded as an unrecorded training run.
- The tokenizer given for calibration (`FWSVDConfig(tokenizer=...)`) is saved with the model, so the folder works
  with `pipeline(model=folder)`.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from typing import Any

from .layers import LowRankLinear
from .report import REPORT_NAME, CompressionReport, FinetuneRecord, report_from_model, weights_fingerprint

__all__ = [
    "calibration_description",
    "describe_calibration",
    "hub_base_model",
    "read_saved_report",
    "record_finetune",
    "refresh_report",
    "source_name",
    "sync_ranks",
    "write_report",
    "write_tokenizer",
]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def describe_calibration(data: Any) -> str | None:
    """A short description of calibration data for the model card, e.g. ``"imdb (train split, 25,000 examples)"``.

    Args:
        data: What was passed as `FWSVDConfig.calibration_dataset` (a `datasets.Dataset`, a list, a `DataLoader`).
    """
    if data is None:
        return None
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(data, "batch_size"):  # a DataLoader
        size = len(dataset) if hasattr(dataset, "__len__") else None
        what = f"a DataLoader over {type(dataset).__name__}"
        return f"{what} ({size:,} examples)" if size is not None else what
    info = getattr(data, "info", None)
    if info is not None and hasattr(data, "column_names"):  # a datasets.Dataset
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "a datasets.Dataset"
        split = f"{data.split} split, " if getattr(data, "split", None) else ""
        return f"{name} ({split}{len(data):,} examples)"
    if hasattr(data, "__len__"):
        return f"{len(data):,} examples passed in Python (no dataset name given)"
    return f"a {type(data).__name__} (size unknown)"


def source_name(source: str | os.PathLike | None) -> str | None:
    """What `FWSVDConfig.base_model` records for the dense model loaded from `source`: a Hub id as given, a local
    folder as ``"./<folder name>"`` (never the absolute path, which would leak the author's file system into
    `config.json`; the ``./`` keeps a folder name from being read as a Hub id)."""
    if source is None or source == "":
        return None
    source = os.fspath(source)
    if os.path.isdir(source):
        return f"./{os.path.basename(os.path.normpath(os.path.abspath(source)))}"
    return source


def hub_base_model(base_model: str | None) -> str | None:
    """`base_model` for the metadata: only a Hub id, never a local path (the Hub rejects paths)."""
    if not base_model or os.path.isabs(base_model) or os.path.exists(base_model):
        return None
    return base_model if _HUB_ID.match(base_model) else None


def sync_ranks(model: Any) -> None:
    """Make the saved rank map match the modules: a merged LoRA adapter grows a `LowRankLinear`'s rank."""
    config = model.config.quantization_config
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) and name in (config.ranks or {}) and config.ranks[name] != module.rank:
            logger.info("%s now has rank %d (was %d): updating the rank map.", name, module.rank, config.ranks[name])
            config.ranks[name] = module.rank


def refresh_report(model: Any) -> CompressionReport:
    """``model.fwsvd_report``, created from the modules if missing and brought up to date with the weights.

    Records a training run when the weights changed since the report was last refreshed.
    """
    report = getattr(model, "fwsvd_report", None)
    if report is None:
        report = report_from_model(model)
        model.fwsvd_report = report
    current = weights_fingerprint(model)
    if report.fingerprint is not None and report.fingerprint != current:
        logger.info("The weights changed since compression: recording an unrecorded training run in the report.")
        report.finetuning.append(FinetuneRecord(by="unrecorded"))
    report.fingerprint = current
    return report


def record_finetune(model: Any, record: FinetuneRecord) -> None:
    """Add a training run to the model's report (its weights after the run become the new reference)."""
    if not hasattr(getattr(model, "config", None), "quantization_config"):
        return  # a dense model: nothing to report
    report = getattr(model, "fwsvd_report", None)
    if report is None:
        refresh_report(model)
        report = model.fwsvd_report
    report.finetuning.append(record)
    report.fingerprint = weights_fingerprint(model)


def calibration_description(model: Any, report: CompressionReport) -> str | None:
    """The report's calibration data description, or one made from the config's calibration data."""
    from .methods import get_method

    if report.calibration_data is not None or not get_method(report.method).needs_data:
        return report.calibration_data
    return describe_calibration(getattr(model.config.quantization_config, "calibration_dataset", None))


def write_report(model: Any, directory: str | os.PathLike) -> None:
    """Write ``fwsvd_report.json`` into `directory` (a `save_atomically` extra writer), with the calibration data
    described; a local path recorded as the base model is left out of the file, which may be pushed to the Hub."""
    report = copy.copy(refresh_report(model))
    report.base_model = hub_base_model(report.base_model)
    report.calibration_data = calibration_description(model, report)
    report.save(directory)


def write_tokenizer(model: Any, directory: str | os.PathLike) -> None:
    """Save the calibration tokenizer (if the config has one) into `directory` (a `save_atomically` extra writer)."""
    tokenizer = getattr(model.config.quantization_config, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(os.fspath(directory))


def read_saved_report(source: str | os.PathLike, **kwargs: Any) -> CompressionReport | None:
    """The report saved with a checkpoint (a local folder or a Hub id), or `None` when it has none.

    Args:
        source (`str` or `os.PathLike`): What was passed to `from_pretrained`.
        kwargs: The `from_pretrained` keyword arguments (`revision`, `subfolder`, `token`, ... are used).
    """
    from transformers.utils import cached_file

    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
    try:
        path = cached_file(
            os.fspath(source),
            REPORT_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except OSError:
        return None
    if path is None:
        return None
    try:
        return CompressionReport.load(path)
    except (OSError, ValueError, TypeError) as error:
        logger.warning("Ignoring %s: it is not a readable FWSVD report (%s).", path, error)
        return None
