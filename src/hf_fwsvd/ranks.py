"""Resolve the rank of every targeted module from `rank`, `rank_ratio`, `param_ratio` and `rank_pattern`."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from .factorize import full_rank, low_rank_params
from .payoff import low_rank_pays_off, max_paying_rank
from .targets import matches

if TYPE_CHECKING:
    from .config import FWSVDConfig

__all__ = ["rank_for_param_ratio", "rank_for_shape", "resolve_ranks"]

logger = logging.getLogger(__name__)


def rank_for_shape(out_features: int, in_features: int, config: FWSVDConfig, name: str) -> int:
    """The rank `config` asks for on one ``out x in`` module (before `rank_pattern` overrides).

    Raises:
        `ValueError`: When the rank is not below the module's full rank (the factorised form would not compress).
    """
    full = full_rank((out_features, in_features))
    if config.rank is not None:
        rank = config.rank
    elif config.param_ratio is not None:
        return rank_for_param_ratio(out_features, in_features, config.param_ratio, name)
    else:
        rank = max(1, round(config.rank_ratio * full))
    return _checked(rank, full, name, out_features, in_features)


def rank_for_param_ratio(out_features: int, in_features: int, param_ratio: float, name: str) -> int:
    """The rank keeping about `param_ratio` of an ``out x in`` module's weights (at least 1), clamped to the largest
    rank that still runs faster than the dense layer (see `payoff`).

    Raises:
        `ValueError`: When the rank is not below the module's full rank.
    """
    rank = max(1, math.floor(param_ratio * out_features * in_features / (out_features + in_features)))
    rank = max(1, min(rank, max_paying_rank(out_features, in_features)))
    return _checked(rank, full_rank((out_features, in_features)), name, out_features, in_features)


def _checked(rank: int, full: int, name: str, out_features: int, in_features: int) -> int:
    if rank >= full:
        raise ValueError(
            f"Rank {rank} for `{name}` ({out_features}x{in_features}) is not below its full rank {full}: the "
            f"factorised layer would keep {low_rank_params(out_features, in_features, rank)} weights instead of "
            f"{out_features * in_features}. Use a smaller rank, a `rank_ratio`, or exclude the module."
        )
    return rank


def _override(name: str, config: FWSVDConfig) -> int | float | None:
    for pattern, value in config.rank_pattern.items():
        if matches(name, [pattern]) or matches(name, pattern):
            return value
    return None


def resolve_ranks(shapes: dict[str, tuple[int, int]], config: FWSVDConfig) -> dict[str, int]:
    """Ranks for every module, honouring `rank_pattern` overrides (int = rank, float = rank ratio).

    Args:
        shapes (`dict[str, tuple[int, int]]`): Module name -> ``(out_features, in_features)``.
        config ([`FWSVDConfig`]): The compression config.

    Returns:
        `dict[str, int]`: Module name -> rank, each in ``[1, min(out, in))``.
    """
    ranks = {}
    for name, (out_features, in_features) in shapes.items():
        override = _override(name, config)
        if override is None:
            ranks[name] = rank_for_shape(out_features, in_features, config, name)
            continue
        full = full_rank((out_features, in_features))
        rank = max(1, round(override * full)) if isinstance(override, float) else override
        ranks[name] = _checked(rank, full, name, out_features, in_features)
    _warn_slow(shapes, ranks)
    return ranks


def _warn_slow(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> None:
    slow = [name for name, rank in ranks.items() if not low_rank_pays_off(*shapes[name], rank)]
    if slow:
        out_features, in_features = shapes[slow[0]]
        logger.warning(
            "%d module(s) get a rank too high to run faster than the dense layer, e.g. `%s` (%dx%d) at rank %d: its "
            "two matmuls cost about as much as the dense one. Ranks up to %d pay off there (see hf_fwsvd.payoff).",
            len(slow),
            slow[0],
            out_features,
            in_features,
            ranks[slow[0]],
            max_paying_rank(out_features, in_features),
        )
