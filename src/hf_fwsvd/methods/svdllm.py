"""`method="svdllm"`: SVD-LLM (Wang et al. 2024): whitening, then the sequential least-squares update of `up`.

The truncation is `whiten`'s (``E[x x^T]``-weighted, see `hf_fwsvd.factorize`); after every target was replaced,
`refine_model` refits each `up` factor on the inputs the module sees in the compressed model, block by block
(`hf_fwsvd.lstsq_update.sequential_update`), which never raises a module's output error on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..factorize import LowRankFactors
from ..lstsq_update import sequential_update
from .registry import register_method
from .whiten import ActivationWhitening

__all__ = ["SVDLLM"]


@register_method
class SVDLLM(ActivationWhitening):
    name = "svdllm"
    title = "SVD-LLM (whitening + sequential least-squares update)"
    short_title = "SVD-LLM"
    references = "Wang et al., ICLR 2025"
    summary = "SVD-LLM: whitening, then each up factor refit by least squares on the compressed model's inputs"
    calibration_use = "the activation second moments (whitening) and the sequential update of the up factors"
    plot_style = {"color": "tab:olive", "marker": "v", "linestyle": "-"}

    def __init__(self) -> None:
        # dense weights seen by `factorize`, kept (by reference) until `refine_model` has used them
        self._dense: dict[str, torch.Tensor] = {}

    def factorize(
        self, weight: torch.Tensor, rank: int, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]], config: Any
    ) -> LowRankFactors:
        self._dense[name] = weight
        return super().factorize(weight, rank, name, stats, config)

    def refine_model(
        self, model: nn.Module, compressed_names: list[str], calibration_batches: Iterable[Any] | None, config: Any
    ) -> None:
        try:
            if calibration_batches is None:
                raise ValueError(
                    f"method={self.name!r} needs calibration data for its sequential update: set "
                    "`calibration_dataset`."
                )
            dense = {name: self._dense[name] for name in compressed_names}
            sequential_update(model, dense, calibration_batches)
        finally:
            self._dense.clear()
