"""`method="tfwsvd"`: FWSVD factors refined on the element-wise Fisher objective by alternating least squares
(after Hua et al., EMNLP 2022; the maths is in `hf_fwsvd.refine`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..factorize import LowRankFactors
from ..refine import refine_elementwise
from .fwsvd import FisherWeightedSVD
from .registry import register_method

__all__ = ["ElementwiseFisherSVD"]

logger = logging.getLogger(__name__)


@register_method
class ElementwiseFisherSVD(FisherWeightedSVD):
    name = "tfwsvd"
    title = "FWSVD refined on the element-wise Fisher (TFWSVD)"
    short_title = "TFWSVD"
    references = "Hua et al., EMNLP 2022 (TFWSVD), on Hsu et al., ICLR 2022 (FWSVD)"
    summary = (
        "FWSVD, then ALS on the element-wise Fisher (refine_iterations sweeps); labelled data, a second weight copy"
    )
    calibration_use = "the row and element-wise Fisher estimates"
    statistics = ("row_fisher", "elementwise_fisher")
    plot_style = {"color": "tab:cyan", "marker": "v", "linestyle": "-"}

    def factorize(
        self,
        weight: torch.Tensor,
        rank: int,
        name: str,
        stats: Mapping[str, Mapping[str, torch.Tensor]],
        config: Any,
    ) -> LowRankFactors:
        result = refine_elementwise(
            weight,
            stats["elementwise_fisher"][name],
            super().factorize(weight, rank, name, stats, config),
            iterations=config.refine_iterations,
            floor=config.importance_floor,
            name=name,
        )
        logger.debug("tfwsvd `%s`: element-wise objective lowered by %.2f%%.", name, 100 * result.improvement)
        return result.factors
