"""Per-module statistics of a compression, for logs, the CLI table and the model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["CompressionReport", "ModuleReport"]


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
class CompressionReport:
    """All modules of one compression plus whole-model parameter counts."""

    method: str
    modules: list[ModuleReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    calibration_samples: int | None = None
    dense_modules: list[str] = field(default_factory=list)
    base_model: str | None = None
    calibration_data: str | None = None  # a description for the model card, e.g. "train.csv (3,200 examples)"

    @property
    def params_ratio(self) -> float:
        return self.model_params_after / max(self.model_params_before, 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["params_ratio"] = self.params_ratio
        return data

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
            lines.append(f"{name:<48} {'(left dense: low rank would not pay off)':>42}")
        lines.append("-" * len(header))
        lines.append(f"{'compressed modules':<48} {'':>11} {'':>5} {before:>10,} {after:>10,}")
        lines.append(
            f"{'whole model':<48} {'':>11} {'':>5} {self.model_params_before:>10,} {self.model_params_after:>10,}"
            f"  ({self.params_ratio:.1%} kept)"
        )
        if not all(row.pays_off for row in self.modules):
            lines.append("slow: rank too high for the two low-rank matmuls to beat the dense layer (hf_fwsvd.payoff)")
        return "\n".join(lines)
