"""`method="svd"`: plain truncated SVD of every weight (no calibration data)."""

from __future__ import annotations

from .base import CompressionMethod
from .registry import register_method

__all__ = ["PlainSVD"]


@register_method
class PlainSVD(CompressionMethod):
    name = "svd"
    title = "plain truncated SVD"
    short_title = "plain SVD"
    references = "Eckart & Young, 1936: the best rank-k approximation"
    summary = "plain truncated SVD of each weight; needs no calibration data"
    calibration_use = None
    statistics = ()
    plot_style = {"color": "tab:orange", "marker": "s", "linestyle": "-"}
