"""When does a rank-``r`` factorisation of an ``out x in`` layer actually pay off?

A dense layer costs ``in * out`` multiply-adds per token and as many weights; its factorised form ``up @ down`` costs
``r * (in + out)`` of each. The factorised form keeps fewer weights whenever ``r * (in + out) < in * out``, but it is
only *faster* when it beats the dense matmul in wall time: two smaller matmuls reach a lower fraction of the
machine's peak than one big one (and add one intermediate tensor), so in practice the low-rank path delivers a
fraction ``efficiency`` of its FLOP-ratio speed-up. It is faster than dense only when
``r * (in + out) < efficiency * in * out``.

`DEFAULT_EFFICIENCY` is the margin we measured on CPU (``benchmarks/inference.py``, recorded in
``benchmarks/results/performance.md``); rank resolution uses it to warn about ranks that do not pay off and to clamp
`param_ratio` ranks. Budget-driven allocation should import these helpers rather than re-derive the rule.
"""

from __future__ import annotations

import math

__all__ = ["DEFAULT_EFFICIENCY", "flop_ratio", "low_rank_pays_off", "max_paying_rank"]

# Fraction of its FLOP-ratio speed-up the two-matmul path reached at batch >= 8 x 128 tokens on CPU (fp32 and bf16,
# MiniLM shapes; see benchmarks/results/performance.md). Ranks whose FLOP ratio is above it are slower than dense.
DEFAULT_EFFICIENCY = 0.8


def flop_ratio(out_features: int, in_features: int, rank: int) -> float:
    """FLOPs (and weights) of the rank-`rank` form relative to the dense layer: ``r (in + out) / (in out)``."""
    return rank * (out_features + in_features) / (out_features * in_features)


def low_rank_pays_off(out_features: int, in_features: int, rank: int, efficiency: float = DEFAULT_EFFICIENCY) -> bool:
    """Whether a rank-`rank` factorisation of an ``out x in`` layer is expected to be faster than the dense layer.

    Args:
        out_features (`int`): Output size of the layer.
        in_features (`int`): Input size of the layer.
        rank (`int`): Rank of the factorisation.
        efficiency (`float`, *optional*): Fraction of the FLOP-ratio speed-up the low-rank path achieves; `1.0`
            gives the pure weight-count rule ``r (in + out) < in out``.
    """
    if not 0 < efficiency <= 1:
        raise ValueError(f"`efficiency` must be in (0, 1], got {efficiency!r}.")
    return flop_ratio(out_features, in_features, rank) < efficiency


def max_paying_rank(out_features: int, in_features: int, efficiency: float = DEFAULT_EFFICIENCY) -> int:
    """The largest rank that still pays off (see [`low_rank_pays_off`]); 0 when no rank does.

    Args:
        out_features (`int`): Output size of the layer.
        in_features (`int`): Input size of the layer.
        efficiency (`float`, *optional*): As in [`low_rank_pays_off`].
    """
    if not 0 < efficiency <= 1:
        raise ValueError(f"`efficiency` must be in (0, 1], got {efficiency!r}.")
    bound = efficiency * out_features * in_features / (out_features + in_features)
    rank = math.ceil(bound) - 1  # strictly below the bound
    return max(0, min(rank, min(out_features, in_features) - 1))
