"""The first token's weight in the gradient-weighted moments of `kfac_whiten` / `fisher_whiten` (issue #16).

`benchmarks/token_weight_spread.py` found that in every `v_proj` the first token of each calibration passage (the
attention sink, whose value every later query reads) carries about 79% of the token weights ``|g_t|^2`` of the input
moment ``C = sum_t |g_t|^2 x_t x_t^T``, so that moment rests on about one token per passage. This module registers
two statistics that hold each passage's first-token term alone, so that a benchmark run can scale that token's weight
by any ``alpha`` without a second calibration pass:

- ``first_token_gradient_second_moment``: ``1/N sum_n |g_n1|^2 x_n1 x_n1^T`` (``in x in``; the first real token of
  each sequence), the first-token part of ``gradient_second_moment``;
- ``first_token_output_gradient_second_moment``: ``1/N sum_n g_n1 g_n1^T`` (``out x out``), the first-token part of
  ``output_gradient_second_moment``.

`first_token_scaled` then gives ``C - (1 - alpha) C_first`` (and the same for ``G`` when asked): ``alpha = 0`` drops
the first token, ``alpha = 1`` is the statistic as collected. Used by ``benchmarks/causal_lm.py``'s ``+firstin<alpha>``
/ ``+firstboth<alpha>`` settings.
"""

from __future__ import annotations

import torch

from hf_fwsvd.statistics import Statistics, register_statistic
from hf_fwsvd.statistics.base import Observation, Statistic

__all__ = [
    "FIRST_TOKEN_INPUT",
    "FIRST_TOKEN_OUTPUT",
    "FirstTokenGradientSecondMoment",
    "FirstTokenOutputGradientSecondMoment",
    "first_token_rows",
    "first_token_scaled",
]

FIRST_TOKEN_INPUT = "first_token_gradient_second_moment"
FIRST_TOKEN_OUTPUT = "first_token_output_gradient_second_moment"
# the statistic each first-token part belongs to
WHOLE = {FIRST_TOKEN_INPUT: "gradient_second_moment", FIRST_TOKEN_OUTPUT: "output_gradient_second_moment"}


def first_token_rows(observation: Observation, tensor: torch.Tensor, statistic: str) -> torch.Tensor:
    """The rows of `tensor` (``batch x tokens x features``) at each sequence's first real token (``batch x
    features``; zero for a row without real tokens).

    Raises:
        `ValueError`: When `tensor` is not ``batch x tokens x features``.
    """
    if tensor.ndim != 3:
        raise ValueError(
            f"`{statistic}` needs the layer's input and output gradient as batch x tokens x features; this layer's "
            f"have shape {tuple(tensor.shape)}. It applies to sequence models."
        )
    real = observation.real_mask()
    if real is None:
        return tensor[:, 0]
    first = real.float().argmax(dim=1)  # the first real token of each row (left or right padding)
    rows = tensor[torch.arange(tensor.shape[0], device=tensor.device), first]
    return rows * real.any(dim=1, keepdim=True).to(rows.dtype)


@register_statistic
class FirstTokenGradientSecondMoment(Statistic):
    name = FIRST_TOKEN_INPUT
    summary = "the first token's part of gradient_second_moment: |g_1|^2 x_1 x_1^T per sequence, in x in"
    needs_backward = True

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (in_features, in_features)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        inputs = first_token_rows(observation, observation.inputs, self.name)
        grads = first_token_rows(observation, observation.grads, self.name)
        weighted = inputs * grads.norm(dim=-1, keepdim=True)
        # the gradients are of the batch-mean loss: scaled as `gradient_second_moment` scales them
        return weighted.T @ weighted * (observation.batch * observation.batch)


@register_statistic
class FirstTokenOutputGradientSecondMoment(Statistic):
    name = FIRST_TOKEN_OUTPUT
    summary = "the first token's part of output_gradient_second_moment: g_1 g_1^T per sequence, out x out"
    needs_backward = True

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (out_features, out_features)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        grads = first_token_rows(observation, observation.grads, self.name)
        return grads.T @ grads * (observation.batch * observation.batch)


def first_token_scaled(stats: Statistics, alpha: float, parts: tuple[str, ...]) -> Statistics:
    """`stats` with each passage's first token weighted `alpha` instead of 1 in the statistics of `parts`.

    Args:
        stats ([`Statistics`]): Holds every statistic of `parts` and the statistic each one is a part of.
        alpha (`float`): The first token's new weight, in ``[0, 1]``.
        parts (`tuple[str, ...]`): `FIRST_TOKEN_INPUT` and / or `FIRST_TOKEN_OUTPUT`.

    Returns:
        [`Statistics`]: A new object (the collected tensors are not modified) with ``whole - (1 - alpha) part`` in
        place of each whole statistic, without the parts; `samples` and `tokens` carried over.

    Raises:
        `ValueError`: When `alpha` is outside ``[0, 1]`` or a part is unknown.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"The first token's weight must be in [0, 1], got {alpha}.")
    unknown = set(parts) - set(WHOLE)
    if unknown:
        raise ValueError(f"Unknown first-token part(s) {sorted(unknown)}; choose from {', '.join(WHOLE)}.")
    scaled = Statistics({key: value for key, value in stats.items() if key not in WHOLE})
    for part in parts:
        whole = WHOLE[part]
        scaled[whole] = {name: matrix - (1.0 - alpha) * stats[part][name] for name, matrix in stats[whole].items()}
    scaled.samples, scaled.tokens = stats.samples, dict(stats.tokens)
    return scaled
