"""`method="whiten"`: SVD-LLM's truncation-aware whitening, the error weighted by the input second moment
``E[x x^T]``, so each discarded singular value squared is the output error it costs on the calibration data."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import CompressionMethod
from .registry import register_method

__all__ = ["ActivationWhitening"]


@register_method
class ActivationWhitening(CompressionMethod):
    name = "whiten"
    title = "activation-whitened SVD (SVD-LLM)"
    short_title = "whiten"
    references = "Wang et al., ICLR 2025"
    summary = "SVD-LLM whitening: error weighted by the input second moment E[x x^T]; any text, no labels"
    calibration_use = "the activation second moments (whitening)"
    statistics = ("activation_second_moment",)
    plot_style = {"color": "tab:green", "marker": "^", "linestyle": "-"}

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return stats["activation_second_moment"][name]
