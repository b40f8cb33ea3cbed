"""`method="fisher_whiten"`: whitening with the gradient-weighted input second moment ``E[|g|^2 x x^T]``, the output
error of each token weighted by how much the task loss reacts to it (see `docs/methods.md`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import CompressionMethod
from .registry import register_method

__all__ = ["FisherWhitening"]


@register_method
class FisherWhitening(CompressionMethod):
    name = "fisher_whiten"
    title = "Fisher-weighted whitening"
    short_title = "Fisher whiten"
    references = (
        "the Fisher weighting of Hsu et al., ICLR 2022 (FWSVD) on the whitening of Wang et al., ICLR 2025 (SVD-LLM)"
    )
    summary = "whitening with the gradient-weighted second moment E[|g|^2 x x^T]; needs labelled task data"
    calibration_use = "the gradient-weighted activation second moments"
    statistics = ("gradient_second_moment",)
    plot_style = {"color": "tab:red", "marker": "P", "linestyle": "-"}

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return stats["gradient_second_moment"][name]
