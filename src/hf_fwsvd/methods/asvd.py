"""`method="asvd"`: ASVD's activation-aware column scaling, the error weighted by ``diag(mean |x|)`` (alpha = 0.5)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import CompressionMethod
from .registry import register_method

__all__ = ["ActivationScaledSVD"]


@register_method
class ActivationScaledSVD(CompressionMethod):
    name = "asvd"
    title = "activation-aware SVD (ASVD)"
    short_title = "ASVD"
    references = "Yuan et al., 2023, ASVD"
    summary = "ASVD: columns scaled by the mean input magnitude mean|x|; any text, no labels"
    calibration_use = "the mean activation magnitudes (ASVD scaling)"
    statistics = ("activation_abs_mean",)
    plot_style = {"color": "tab:purple", "marker": "D", "linestyle": "-"}

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return stats["activation_abs_mean"][name]
