"""`method="whiten_v2"`: `whiten`'s objective truncated by SVD-LLM V2's two SVDs instead of a Cholesky factor.

The weighting is the input second moment ``E[x x^T]``, as for `whiten`; the factorisation is V2's loss-optimised
truncation (`hf_fwsvd.two_svd`): an SVD of ``C = U_c S_c U_c^T``, an SVD of ``W U_c S_c^{1/2}``, and the map back
by ``S_c^{-1/2} U_c^T`` (a pseudo-inverse where ``C`` is singular), with no damping. For a positive definite ``C`` it
keeps the same approximation as `whiten`; where ``C`` is singular both reach the same calibration error, and `whiten`
keeps ``W``'s action on the directions no calibration input reached while this one maps them to zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..factorize import LowRankFactors
from ..two_svd import two_svd_truncation
from .registry import register_method
from .whiten import ActivationWhitening

__all__ = ["TwoSVDWhitening"]


@register_method
class TwoSVDWhitening(ActivationWhitening):
    name = "whiten_v2"
    title = "activation whitening through two SVDs (SVD-LLM V2's loss-optimised truncation)"
    short_title = "whiten (two SVDs, V2)"
    summary = "SVD-LLM V2's truncation: SVD of E[x x^T] = U S U^T, SVD of W U S^1/2, back by S^-1/2 U^T; no Cholesky"
    plot_style = {"color": "tab:gray", "marker": "<", "linestyle": "--"}

    def factorize(
        self, weight: torch.Tensor, rank: int, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]], config: Any
    ) -> LowRankFactors:
        return two_svd_truncation(weight, rank, self.importance(name, stats), floor=config.importance_floor, name=name)
