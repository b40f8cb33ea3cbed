"""`method="fisher_svdllm"`: `fisher_whiten`'s truncation, then SVD-LLM's sequential least-squares update of `up`.

The truncation weighs each token's output error by how much the task loss reacts to it (the gradient-weighted input
second moment ``E[|g|^2 x x^T]``, see `fisher_whiten`); after every target was replaced, `refine_model` refits each
`up` factor for its Fisher-chosen `down` on the inputs the module sees in the compressed model, block by block
(`hf_fwsvd.lstsq_update.sequential_update`), which never raises a module's output error on them. Chosen as the
causal-LM default on a development text (`benchmarks/causal_lm.py`, see `hf_fwsvd.defaults`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .registry import register_method
from .svdllm import SVDLLM

__all__ = ["FisherSVDLLM"]


@register_method
class FisherSVDLLM(SVDLLM):
    name = "fisher_svdllm"
    title = "Fisher-weighted whitening + SVD-LLM's sequential least-squares update"
    short_title = "Fisher SVD-LLM"
    references = (
        "the Fisher weighting of Hsu et al., ICLR 2022 (FWSVD) on the whitening and update of Wang et al., ICLR 2025 "
        "(SVD-LLM)"
    )
    summary = (
        "fisher_whiten's truncation, then each up factor refit by least squares on the compressed model's inputs; "
        "needs labelled task data"
    )
    calibration_use = "the gradient-weighted activation second moments and the sequential update of the up factors"
    statistics = ("gradient_second_moment",)
    plot_style = {"color": "tab:brown", "marker": "X", "linestyle": "-"}

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return stats["gradient_second_moment"][name]
