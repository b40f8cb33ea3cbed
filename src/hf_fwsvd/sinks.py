"""Attention-sink modules: where each sequence's first token carries most of a layer's output energy.

Causal LMs put massive activations on the first position, which later tokens attend to as a sink. In a few layers'
`down_proj` almost all of the output energy on calibration text is that one token's (SmolLM2-135M: 0.25-1.0 of it in
six of 30 layers, against 0.004 for a uniform share; `benchmarks/first_token_energy.py`). A second-order loss estimate
(the Fisher scores of the global allocation) undervalues these modules: they got some of the lowest ranks, and
keeping the six dense at the same budget lowered SmolLM2's perplexity 3% on every evaluation text
(benchmarks/README.md, "Attention-sink modules kept dense"). `FWSVDConfig(sink_threshold=...)` keeps every module
whose first-token share exceeds the threshold dense inside the allocation.
"""

from __future__ import annotations

import logging

from .statistics import Statistics

__all__ = ["FIRST_TOKEN_OUTPUT_ENERGY", "first_token_shares", "sink_modules"]

logger = logging.getLogger(__name__)

FIRST_TOKEN_OUTPUT_ENERGY = "first_token_output_energy"


def first_token_shares(stats: Statistics) -> dict[str, float]:
    """Each module's share of output energy on the first real token of the calibration sequences.

    Args:
        stats ([`Statistics`]): Holds `first_token_output_energy` for the modules.

    Returns:
        `dict[str, float]`: Module name -> ``sum_n |y_n1|^2 / sum_nt |y_nt|^2`` (0 for a module with no output).
    """
    shares = {}
    for name, energy in stats[FIRST_TOKEN_OUTPUT_ENERGY].items():
        first, total = (float(value) for value in energy)
        shares[name] = first / total if total > 0 else 0.0
    return shares


def sink_modules(stats: Statistics, threshold: float) -> list[str]:
    """The modules whose first-token share of output energy exceeds `threshold`, in order.

    Args:
        stats ([`Statistics`]): Holds `first_token_output_energy`.
        threshold (`float`): Share in (0, 1) above which a module is a sink module.
    """
    shares = first_token_shares(stats)
    sinks = [name for name, share in shares.items() if share > threshold]
    if sinks:
        logger.info(
            "Keeping %d attention-sink module(s) dense (first-token share of output energy above %s): %s.",
            len(sinks),
            threshold,
            ", ".join(f"{name} ({shares[name]:.2f})" for name in sinks),
        )
    return sinks
