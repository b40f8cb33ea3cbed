"""`FWSVDConfig(first_token_weight=...)`: each calibration sequence's first token weighed less in the
gradient-weighted moments of `fisher_whiten`, `kfac_whiten` and their `*_svdllm` variants.

Their input moment ``C = sum_t |g_t|^2 x_t x_t^T`` weighs each token by the squared loss gradient at the module
output. In a causal LM's `v_proj` the first token of each sequence (the attention sink, whose value every later query
reads) carries about 79% of that weight on SmolLM2-135M, so ``C`` rests on about one token per sequence and its
spectrum, which also sets the module's share of a global budget, is mostly that token's
(`benchmarks/token_weight_spread.py`). The first token's parts of ``C`` and of the output-gradient moment ``G`` are
collected as statistics of their own (``first_token_gradient_second_moment``,
``first_token_output_gradient_second_moment``); a weight ``w`` then gives ``C - (1 - w) C_first`` (and the same for
``G``): ``w = 1`` is the moment as collected, ``w = 0`` leaves the first token out.
"""

from __future__ import annotations

from collections.abc import Iterable

from .statistics import Statistics

__all__ = ["FIRST_TOKEN_PARTS", "first_token_parts", "reweighs", "reweigh_first_token"]

# the gradient-weighted moment -> its first-token part
FIRST_TOKEN_PARTS = {
    "gradient_second_moment": "first_token_gradient_second_moment",
    "output_gradient_second_moment": "first_token_output_gradient_second_moment",
}


def reweighs(weight: float | None) -> bool:
    """Whether `FWSVDConfig.first_token_weight` changes the moments (set, and not 1)."""
    return weight is not None and weight != 1


def first_token_parts(method: str, method_statistics: Iterable[str], weight: float | None) -> tuple[str, ...]:
    """The first-token statistics a method needs for `weight` (none when `weight` is unset or 1).

    Args:
        method (`str`): The method's name (for the error message).
        method_statistics (`Iterable[str]`): The statistics the method reads.
        weight (`float`, *optional*): `FWSVDConfig.first_token_weight`.

    Raises:
        `ValueError`: When `weight` is set below 1 and the method reads no gradient-weighted moment.
    """
    if not reweighs(weight):
        return ()
    parts = tuple(FIRST_TOKEN_PARTS[name] for name in method_statistics if name in FIRST_TOKEN_PARTS)
    if not parts:
        raise ValueError(
            f"`first_token_weight={weight}` reweighs the gradient-weighted moments ({', '.join(FIRST_TOKEN_PARTS)}), "
            f"and method={method!r} reads neither. Use fisher_whiten, kfac_whiten, fisher_svdllm or kfac_svdllm, or "
            "leave `first_token_weight` unset."
        )
    return parts


def reweigh_first_token(stats: Statistics, weight: float | None) -> Statistics:
    """`stats` with each sequence's first token weighed `weight` instead of 1 in the gradient-weighted moments.

    Args:
        stats ([`Statistics`]): The collected statistics, with the first-token part of every gradient-weighted moment
            it holds (see `first_token_parts`).
        weight (`float`, *optional*): The first token's weight in ``[0, 1]``; unset or 1 returns `stats` itself.

    Returns:
        [`Statistics`]: A new object (the collected tensors are not modified) with ``whole - (1 - weight) part`` for
        each moment, without the parts; `samples` and `tokens` carried over.

    Raises:
        `ValueError`: When a moment's first-token part is missing.
    """
    if not reweighs(weight):
        return stats
    result = Statistics({key: value for key, value in stats.items() if key not in FIRST_TOKEN_PARTS.values()})
    for whole, part in FIRST_TOKEN_PARTS.items():
        if whole not in stats:
            continue
        if part not in stats:
            raise ValueError(
                f"`first_token_weight` needs `{part}` next to `{whole}`; collect the statistics with this config "
                "(`hf_fwsvd.methods.collect_statistics`)."
            )
        result[whole] = {name: moment - (1.0 - weight) * stats[part][name] for name, moment in stats[whole].items()}
    result.samples, result.tokens = stats.samples, dict(stats.tokens)
    return result
