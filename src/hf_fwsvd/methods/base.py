"""`CompressionMethod`: what one compression method supplies, and nothing else.

A method names the calibration statistics it needs (see `hf_fwsvd.statistics`) and turns them into a factorisation
of one weight. Targets, calibration passes, rank allocation, module replacement and the report belong to the pipeline
(`hf_fwsvd.pipeline`), which runs the same way for every method, in memory (`compress`) or block by block
(`compress_layerwise`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..factorize import LowRankFactors, factorize, weighted_matrix

__all__ = ["CompressionMethod"]


class CompressionMethod:
    """Base class of a compression method; subclass it in one file and register it with
    [`~hf_fwsvd.methods.register_method`].

    Class attributes:
        name (`str`): The `FWSVDConfig(method=...)` value, CLI choice and checkpoint field (a Python identifier).
        title (`str`): Full name for the model card, e.g. ``"Fisher-Weighted SVD (FWSVD)"``.
        short_title (`str`): Short name for plot legends and one-line notes, e.g. ``"FWSVD"``.
        references (`str`): Where the method comes from, for the model card, e.g. ``"Hsu et al., ICLR 2022"`` (empty:
            the card names the method only).
        summary (`str`): One line for `--help`, the docs table and the sweep legend.
        calibration_use (`str` or `None`): What the calibration data is used for, completing "N examples used for
            ..." on the model card; `None` when the method needs no data.
        statistics (`tuple[str, ...]`): Names of the registered statistics it reads (see `hf_fwsvd.statistics`).
        plot_style (`dict`): Matplotlib style of its line in `hf-fwsvd sweep` plots (`color`, `marker`, `linestyle`).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    short_title: ClassVar[str]
    references: ClassVar[str] = ""
    summary: ClassVar[str]
    calibration_use: ClassVar[str | None] = None
    statistics: ClassVar[tuple[str, ...]] = ()
    plot_style: ClassVar[dict[str, Any]] = {}

    @property
    def needs_data(self) -> bool:
        """Whether the method reads calibration data (it needs a statistic or says what it uses data for)."""
        return self.calibration_use is not None or bool(self.statistics)

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor | None:
        """The input-side weighting of module `name`: a vector (one value per input feature), a PSD ``in x in``
        matrix, or `None` for none. It weighs the rank-allocation scores and the report's weighted error.

        Args:
            name (`str`): Module name.
            stats (`Mapping`): Statistic name -> module name -> fp32 tensor (the statistics in `statistics`).
        """
        return None

    def weighted_matrix(
        self, name: str, weight: torch.Tensor, stats: Mapping[str, Mapping[str, torch.Tensor]], config: Any
    ) -> torch.Tensor:
        """The float32 matrix whose squared singular values score the directions `factorize` keeps or drops (the
        global rank allocation reads it); by default ``W M`` for the weighting `importance` returns.

        Args:
            name (`str`): Module name.
            weight (`torch.Tensor`): The dense weight (``out x in``).
            stats (`Mapping`): Statistic name -> module name -> fp32 tensor.
            config ([`FWSVDConfig`]): The run's config (`importance_floor`).
        """
        return weighted_matrix(weight, self.importance(name, stats), config.importance_floor)

    def factorize(
        self,
        weight: torch.Tensor,
        rank: int,
        name: str,
        stats: Mapping[str, Mapping[str, torch.Tensor]],
        config: Any,
    ) -> LowRankFactors:
        """Factorise one ``out x in`` weight at `rank`; by default the optimum of ``||(W - A B) M||_F`` for the
        weighting `importance` returns (see `hf_fwsvd.factorize`).

        Args:
            weight (`torch.Tensor`): The dense weight (PyTorch layout ``out x in``).
            rank (`int`): Target rank.
            name (`str`): Module name (for error messages and statistics look-up).
            stats (`Mapping`): Statistic name -> module name -> fp32 tensor.
            config ([`FWSVDConfig`]): The run's config (`importance_floor`, `svd_solver`, method options).

        Returns:
            [`LowRankFactors`] in float32.
        """
        return factorize(
            weight,
            rank,
            self.importance(name, stats),
            floor=config.importance_floor,
            name=name,
            svd_solver=config.svd_solver,
        )

    def refine_model(
        self, model: nn.Module, compressed_names: list[str], calibration_batches: Iterable[Any] | None, config: Any
    ) -> None:
        """Optional model-level step after every target was replaced (default: nothing).

        For methods that need the partially compressed model's activations (e.g. a sequential parameter update);
        the pipeline calls it before the report is finalised. A method that overrides it cannot run block by block
        (`compress_layerwise` refuses it).
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
