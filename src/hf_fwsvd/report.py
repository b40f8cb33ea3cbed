"""Per-module statistics of a compression, for logs, the CLI table and the model card.

The report travels with the checkpoint: `save_pretrained` writes it as ``fwsvd_report.json`` next to the weights and
`from_pretrained` reads it back into ``model.fwsvd_report`` (see `integration`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "REPORT_NAME",
    "CompressionReport",
    "FinetuneRecord",
    "ModuleReport",
    "report_from_model",
    "weights_fingerprint",
]

REPORT_NAME = "fwsvd_report.json"
_FINGERPRINT_SAMPLES = 1 << 16  # elements hashed per model, spread evenly over every parameter
_FINGERPRINT_RUN = 64  # ... in runs of this many contiguous elements


@dataclass
class ModuleReport:
    """What happened to one module."""

    name: str
    out_features: int
    in_features: int
    rank: int
    params_before: int
    params_after: int
    plain_error: float
    weighted_error: float
    pays_off: bool = True  # whether the rank is low enough to run faster than the dense layer (see `payoff`)


@dataclass
class FinetuneRecord:
    """One training run after compression, for the model card.

    Args:
        by (`str`): What trained it: ``"hf_fwsvd.finetune"``, or ``"unrecorded"`` when the weights changed after
            compression without going through `finetune` (a `transformers.Trainer` run, a merged LoRA adapter, ...).
        examples (`int`, *optional*): Training examples.
        epochs (`float`, *optional*): Epochs.
        steps (`int`, *optional*): Optimizer steps.
        learning_rate (`float`, *optional*): Peak learning rate.
        train_loss (`float`, *optional*): Mean training loss.
        data (`str`, *optional*): A description of the training data.
        objective (`str`, *optional*): The training loss when it is not the model's own, e.g. ``"distillation from a
            teacher model (KL, temperature 1)"``.
    """

    by: str
    examples: int | None = None
    epochs: float | None = None
    steps: int | None = None
    learning_rate: float | None = None
    train_loss: float | None = None
    data: str | None = None
    objective: str | None = None


@dataclass
class CompressionReport:
    """All modules of one compression plus whole-model parameter counts.

    `warnings` holds sentences that every consumer must show (the model card puts them at the top), e.g. a collapse
    of the compressed model's quality; `finetuning` the training runs after compression; `fingerprint` a hash of the
    weights when the report was last brought up to date, so a save can tell that they were trained since.
    """

    method: str
    modules: list[ModuleReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    calibration_samples: int | None = None
    dense_modules: list[str] = field(default_factory=list)
    sink_modules: list[str] = field(default_factory=list)  # those of `dense_modules` kept dense as attention sinks
    base_model: str | None = None
    calibration_data: str | None = None  # a description for the model card, e.g. "train.csv (3,200 examples)"
    warnings: list[str] = field(default_factory=list)
    finetuning: list[FinetuneRecord] = field(default_factory=list)
    factor_storage: str | None = None  # e.g. "int8 per-channel weight-only (torchao ...)"; None: the model dtype
    module_bytes_before: int = 0  # bytes of the compressed modules' parameters as stored, before and after
    module_bytes_after: int = 0
    fingerprint: str | None = field(default=None, compare=False)

    @property
    def params_ratio(self) -> float:
        return self.model_params_after / max(self.model_params_before, 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("fingerprint")
        data["params_ratio"] = self.params_ratio
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """Inverse of [`to_dict`] (keys a newer version added are ignored; NaN errors come back as NaN)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        module_fields = {f.name for f in fields(ModuleReport)}
        values["modules"] = [
            ModuleReport(**{key: _nan(value) for key, value in row.items() if key in module_fields})
            for row in values.get("modules", [])
        ]
        record_fields = {f.name for f in fields(FinetuneRecord)}
        values["finetuning"] = [
            FinetuneRecord(**{key: value for key, value in row.items() if key in record_fields})
            for row in values.get("finetuning", [])
        ]
        return cls(**values)

    def save(self, directory: str | os.PathLike) -> str:
        """Write the report as `REPORT_NAME` in `directory` (strict JSON: NaN becomes `null`); returns the path."""
        data = self.to_dict()
        data.pop("params_ratio")
        data["fingerprint"] = self.fingerprint
        path = os.path.join(os.fspath(directory), REPORT_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(_no_nan(data), handle, indent=2, allow_nan=False)
            handle.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompressionReport:
        """Read a report written by [`save`] (`path` is the file)."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def format_table(self) -> str:
        """A plain-text table: module, shape, rank, params before/after, plain and weighted relative error."""
        header = f"{'module':<48} {'shape':>11} {'rank':>5} {'before':>10} {'after':>10} {'err':>7} {'w-err':>7}"
        lines = [header, "-" * len(header)]
        for row in self.modules:
            shape = f"{row.out_features}x{row.in_features}"
            lines.append(
                f"{row.name:<48} {shape:>11} {row.rank:>5} {row.params_before:>10,} {row.params_after:>10,} "
                f"{row.plain_error:>7.4f} {row.weighted_error:>7.4f}" + ("" if row.pays_off else "  slow")
            )
        before = sum(row.params_before for row in self.modules)
        after = sum(row.params_after for row in self.modules)
        for name in self.dense_modules:
            reason = "attention sink" if name in self.sink_modules else "low rank would not pay off"
            lines.append(f"{name:<48} {f'(left dense: {reason})':>42}")
        lines.append("-" * len(header))
        lines.append(f"{'compressed modules':<48} {'':>11} {'':>5} {before:>10,} {after:>10,}")
        lines.append(
            f"{'whole model':<48} {'':>11} {'':>5} {self.model_params_before:>10,} {self.model_params_after:>10,}"
            f"  ({self.params_ratio:.1%} kept)"
        )
        if not all(row.pays_off for row in self.modules):
            lines.append("slow: rank too high for the two low-rank matmuls to beat the dense layer (hf_fwsvd.payoff)")
        return "\n".join(lines)


def _nan(value: Any) -> Any:
    return math.nan if value is None else value


def _no_nan(value: Any) -> Any:
    """`value` with every float NaN replaced by `None` (strict JSON has no NaN)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: _no_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_no_nan(item) for item in value]
    return value


def weights_fingerprint(model: Any) -> str:
    """A short hash of a model's weights that changes when it is trained, cheap enough for every save and load.

    About `_FINGERPRINT_SAMPLES` elements are hashed, taken from every parameter (sorted by name) in proportion to its
    size, at least one each, as evenly spaced runs of `_FINGERPRINT_RUN` contiguous elements; a training step moves
    practically every element, so a fine-tune is detected, while the same weights on another device or after a save and
    reload give the same hash (raw bytes, no floating-point reduction). Contiguous runs touch few memory pages: one
    element in every few dozen (the earlier sampling) touched every page of the freshly memory-mapped weights, 25 ms
    of a 105 ms MiniLM reload (a dense load: 60 ms) and 40 ms of a SmolLM2 one.
    """
    import torch

    named = []
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if hasattr(param, "qdata") and hasattr(param, "scale"):  # int8 factor (`factor_storage`): hash its parts
            named.extend((f"{name}_{part}", getattr(param, part)) for part in ("qdata", "scale"))
        else:
            named.append((name, param))
    total = max(1, sum(param.numel() for _, param in named))
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, param in named:
            if param.device.type == "meta" or param.numel() == 0:
                continue
            flat = param.detach().reshape(-1)
            count = min(flat.numel(), max(1, flat.numel() * _FINGERPRINT_SAMPLES // total))
            run = min(_FINGERPRINT_RUN, count)
            runs = count // run
            step = flat.numel() // runs
            strided = flat.as_strided((runs, run), (step, 1), flat.storage_offset())
            sample = torch.empty(strided.shape, dtype=strided.dtype).copy_(strided)  # dense, on CPU
            digest.update(name.encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _record_bytes(report: CompressionReport, model: Any, config: Any) -> None:
    """Factor storage and bytes of a reloaded model's compressed modules (before: their dense weight and bias in the
    factors' float dtype, or the scales' dtype for int8 factors)."""
    from .factor_storage import INT8_STORAGE, storage_bytes
    from .layers import LowRankLinear

    report.factor_storage = INT8_STORAGE if getattr(config, "factor_dtype", None) == "int8" else None
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            report.module_bytes_after += sum(storage_bytes(param) for param in module.parameters())
            weight = module.up.weight
            size = getattr(weight, "scale", weight).element_size()  # the model dtype
            report.module_bytes_before += (module.in_features + int(module.up.bias is not None)) * (
                module.out_features * size
            )


def report_from_model(model: Any) -> CompressionReport:
    """Rebuild the statistics of a reloaded checkpoint from its low-rank modules (errors are unknown)."""
    from .factorize import low_rank_params
    from .layers import LowRankLinear

    config = model.config.quantization_config
    report = CompressionReport(method=config.method, base_model=config.base_model)
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            out_features, in_features, rank = module.out_features, module.in_features, module.rank
            report.modules.append(
                ModuleReport(
                    name=name,
                    out_features=out_features,
                    in_features=in_features,
                    rank=rank,
                    params_before=out_features * in_features,
                    params_after=low_rank_params(out_features, in_features, rank),
                    plain_error=float("nan"),
                    weighted_error=float("nan"),
                )
            )
    _record_bytes(report, model, config)
    report.model_params_after = sum(param.numel() for param in model.parameters())
    saved = sum(row.params_before - row.params_after for row in report.modules)
    report.model_params_before = report.model_params_after + saved
    return report
