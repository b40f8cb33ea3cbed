"""`method="fwsvd"`: Fisher-Weighted SVD (Hsu et al., ICLR 2022), the error weighted by the row Fisher ``diag(F)``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import CompressionMethod
from .registry import register_method

__all__ = ["FisherWeightedSVD"]


@register_method
class FisherWeightedSVD(CompressionMethod):
    name = "fwsvd"
    title = "Fisher-Weighted SVD (FWSVD)"
    short_title = "FWSVD"
    references = "Hsu et al., ICLR 2022"
    summary = "Fisher-weighted SVD (the paper): error weighted by the row Fisher; needs labelled task data"
    calibration_use = "the Fisher estimate"
    statistics = ("row_fisher",)
    plot_style = {"color": "tab:blue", "marker": "o", "linestyle": "-"}

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return stats["row_fisher"][name]
