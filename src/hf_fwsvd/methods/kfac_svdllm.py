"""`method="kfac_svdllm"`: `kfac_whiten`'s two-sided truncation, then SVD-LLM's sequential update of `up`.

The truncation weighs the error by a Kronecker-factored Fisher, ``tr(G dW C dW^T)`` with ``C = E[|g|^2 x x^T]`` and
``G = E[g g^T]`` (see `kfac_whiten`, `hf_fwsvd.kronecker`); the global allocation scores `fisher_whiten`'s one-sided
spectrum; after every target was replaced, `refine_model` refits each `up` factor for its `down` on the inputs the
module sees in the compressed model (`hf_fwsvd.lstsq_update.sequential_update`). An unconstrained `up` refit is the
same for any output weighting, so the update keeps the two-sided objective's choice of `down`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..factorize import LowRankFactors
from .kfac_whiten import KroneckerFisherWhitening
from .registry import register_method
from .svdllm import SVDLLM

__all__ = ["KroneckerSVDLLM"]


@register_method
class KroneckerSVDLLM(SVDLLM):
    name = "kfac_svdllm"
    title = "Kronecker-factored Fisher whitening + SVD-LLM's sequential least-squares update"
    short_title = "K-FAC SVD-LLM"
    references = (
        "the Kronecker-factored Fisher of Martens & Grosse, ICML 2015 (K-FAC), as in Chekalina et al., 2025 "
        "(GFWSVD), with the update of Wang et al., ICLR 2025 (SVD-LLM)"
    )
    summary = (
        "kfac_whiten's two-sided truncation, then each up factor refit by least squares on the compressed model's "
        "inputs; needs labelled task data"
    )
    calibration_use = (
        "the gradient-weighted input and output-gradient second moments and the sequential update of the up factors"
    )
    statistics = ("gradient_second_moment", "output_gradient_second_moment")
    plot_style = {"color": "tab:gray", "marker": "h", "linestyle": "-"}

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return stats["gradient_second_moment"][name]

    def factorize(
        self, weight: torch.Tensor, rank: int, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]], config: Any
    ) -> LowRankFactors:
        self._dense[name] = weight
        return KroneckerFisherWhitening.factorize(self, weight, rank, name, stats, config)
