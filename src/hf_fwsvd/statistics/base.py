"""`Statistic`: one named calibration statistic of a linear layer, and `Statistics`, what a calibration run collected.

A statistic declares whether it needs the gradient at the layer output (labels and a backward pass) and how one
batch's observation of a layer ``y = x W^T + b`` (its input ``x`` and, for backward statistics, ``g = dL/dy``) adds to
its fp32 sum; the collector (`hf_fwsvd.statistics.collector`) owns the hooks, the batches, the processes and the
division by the number of examples (or of real tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = ["Observation", "Statistic", "Statistics"]


@dataclass
class Observation:
    """One batch seen by one layer, with the shared intermediates every statistic may reuse.

    Args:
        inputs (`torch.Tensor`): The layer input, float32, ``batch x ... x in``.
        grads (`torch.Tensor`, *optional*): The gradient of the batch-mean loss at the layer output (float32,
            ``batch x ... x out``); `None` in a forward-only observation.
        mask (`torch.Tensor`, *optional*): The batch's ``attention_mask`` (``batch x tokens``), when it has one.
        outputs (`torch.Tensor`, *optional*): The layer output as the layer computed it (its own dtype, not copied),
            ``batch x ... x out``, in a forward observation.
        requested (`frozenset[str]`): Every statistic collected in this run (to share intermediates).
        estimator (`str`): The Fisher estimator of the run (see `hf_fwsvd.statistics.collector`): backward
            statistics square per-example gradients unless it is ``"batch"``, where they square the batch gradient.
    """

    inputs: torch.Tensor
    grads: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    requested: frozenset[str] = frozenset()
    estimator: str = "empirical"
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        """Examples in the batch (1 for an unbatched input)."""
        return self.inputs.shape[0] if self.inputs.ndim >= 2 else 1

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()` once per observation: intermediates shared by several statistics."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def real_mask(self) -> torch.Tensor | None:
        """The boolean ``batch x tokens`` mask of real tokens, or `None` when the batch has no mask that matches its
        input (then every row is real)."""
        rows = self.inputs
        if self.mask is not None and rows.ndim == 3 and tuple(self.mask.shape) == tuple(rows.shape[:2]):
            return self.mask.to(rows.device).bool()
        return None

    def real_rows(self) -> torch.Tensor:
        """The input rows of real tokens (``n x in``): padding dropped when the mask matches ``batch x tokens``."""

        def compute() -> torch.Tensor:
            rows, real = self.inputs, self.real_mask()
            rows = rows if real is None else rows[real]
            return rows.reshape(-1, rows.shape[-1])

        return self.memo("real_rows", compute)

    def real_token_count(self) -> int:
        """How many real tokens (rows of `real_rows`) the batch has, without copying them."""
        real = self.real_mask()
        return int(real.sum()) if real is not None else self.inputs.reshape(-1, self.inputs.shape[-1]).shape[0]


class Statistic:
    """Base class of a calibration statistic; subclass it and register it with
    [`~hf_fwsvd.statistics.register_statistic`].

    Class attributes:
        name (`str`): The name methods list in `CompressionMethod.statistics`.
        summary (`str`): One line for the docs.
        needs_backward (`bool`): Whether it reads output gradients (labels and a backward pass per batch).
        per (`str`): `"example"`: the sum is divided by the number of calibration examples; `"token"`: by the number
            of real tokens that reached the layer.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_backward: ClassVar[bool] = False
    per: ClassVar[str] = "example"

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        """Shape of the statistic of an ``out x in`` layer."""
        raise NotImplementedError

    def accumulate(self, observation: Observation) -> torch.Tensor:
        """This batch's float32 contribution to the sum (same shape as `shape`)."""
        raise NotImplementedError


class Statistics(dict):
    """What calibration collected: statistic name -> module name -> fp32 CPU tensor (already divided).

    Attributes:
        samples (`int`, *optional*): Calibration examples seen (over all processes), when collected here.
        tokens (`dict[str, int]`): Real tokens that reached each module (forward statistics only).
    """

    samples: int | None = None
    tokens: dict[str, int] = {}  # noqa: RUF012  (replaced per instance by the collector, never mutated)

    def missing(self, statistic: str, modules: list[str] | dict[str, Any]) -> list[str]:
        """The modules of `modules` that lack `statistic`."""
        table = self.get(statistic) or {}
        return [name for name in modules if name not in table]

    def subset(self, statistics: tuple[str, ...] | list[str], modules: list[str] | dict[str, Any]) -> Statistics:
        """Only `statistics` and only `modules` (shared tensors, no copy)."""
        return Statistics({key: {name: self[key][name] for name in modules} for key in statistics if key in self})
