"""`method="kfac_whiten"`: `fisher_whiten` made two-sided, the truncation weighted by a Kronecker-factored Fisher.

`fisher_whiten` weighs each token's output error by the squared norm of the loss gradient at the layer output, the
same for every output direction. Here the output side is weighted too, by the gradients' second moment
``G = E[g g^T]``, so the output directions the loss is sensitive to are kept first: the objective is
``tr(G (W - W') C (W - W')^T)`` with ``C = E[|g|^2 x x^T]`` (see `hf_fwsvd.kronecker`). With ``G`` proportional to
the identity it is exactly `fisher_whiten`.

The global allocation scores each module by `fisher_whiten`'s one-sided spectrum (the inherited `weighted_matrix`),
not by the two-sided one: on SmolLM2 the two-sided spectrum moved the budget so badly that perplexity rose by half
(`benchmarks/kfac_screen.py --two-sided-allocation`, benchmarks/README.md), while the two-sided truncation under the
one-sided allocation was the best setting measured without fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..factorize import LowRankFactors
from ..kronecker import kronecker_factorize
from .base import CompressionMethod
from .registry import register_method

__all__ = ["KroneckerFisherWhitening"]


@register_method
class KroneckerFisherWhitening(CompressionMethod):
    name = "kfac_whiten"
    title = "Kronecker-factored Fisher whitening (two-sided)"
    short_title = "K-FAC whiten"
    references = (
        "the Kronecker-factored Fisher of Martens & Grosse, ICML 2015 (K-FAC), as in Chekalina et al., 2025 "
        "(GFWSVD), on the gradient-weighted whitening of `fisher_whiten`"
    )
    summary = (
        "whitening with E[|g|^2 x x^T] on the input side and the output-gradient moment E[g g^T] on the output side; "
        "needs labelled task data"
    )
    calibration_use = "the gradient-weighted input and output-gradient second moments"
    statistics = ("gradient_second_moment", "output_gradient_second_moment")
    plot_style = {"color": "tab:pink", "marker": "*", "linestyle": "-"}

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return stats["gradient_second_moment"][name]

    def factorize(
        self,
        weight: torch.Tensor,
        rank: int,
        name: str,
        stats: Mapping[str, Mapping[str, torch.Tensor]],
        config: Any,
    ) -> LowRankFactors:
        return kronecker_factorize(
            weight,
            rank,
            self.importance(name, stats),
            stats["output_gradient_second_moment"][name],
            floor=config.importance_floor,
            name=name,
            svd_solver=config.svd_solver,
        )
