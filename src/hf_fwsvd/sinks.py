"""Attention-sink modules: where each sequence's first token carries far more output energy than the others.

Causal LMs put massive activations on the first position, which later tokens attend to as a sink. In a few layers'
`down_proj` the first token's output energy on calibration text is 84 to 550,000 times a later token's
(SmolLM2-135M: six of 30 layers; under 35 times everywhere else; `benchmarks/first_token_energy.py`). A second-order
loss estimate (the Fisher scores of the global allocation) can undervalue these modules: they got some of the lowest
ranks. Keeping the six dense at the same budget lowered SmolLM2's development perplexity at 80% kept with speech
calibration, was neutral with a large genre mix and cost 3.6% at 60% kept (benchmarks/README.md, "Attention-sink
modules kept dense"), so it is an option, off by default. `FWSVDConfig(sink_threshold=...)` keeps every module whose
first-token energy ratio exceeds the threshold dense inside the allocation. The ratio compares mean energies
per token, so it does not depend on the calibration sequences' length.
"""

from __future__ import annotations

import logging

from .statistics import Statistics

__all__ = ["FIRST_TOKEN_OUTPUT_ENERGY", "first_token_energy_ratios", "log_sink_modules", "sink_modules"]

logger = logging.getLogger(__name__)

FIRST_TOKEN_OUTPUT_ENERGY = "first_token_output_energy"


def first_token_energy_ratios(stats: Statistics) -> dict[str, float]:
    """Each module's mean output energy on the first real token of a calibration sequence, over that of a later token.

    Args:
        stats ([`Statistics`]): Holds `first_token_output_energy` for the modules.

    Returns:
        `dict[str, float]`: Module name -> ``(E_first / N_first) / (E_other / N_other)``; `inf` when the later tokens
        have no output energy (or there are none) and the first token has some, 0 when neither has any.
    """
    ratios = {}
    for name, values in stats[FIRST_TOKEN_OUTPUT_ENERGY].items():
        first, other, sequences, others = (float(value) for value in values)
        first_mean = first / sequences if sequences > 0 else 0.0
        other_mean = other / others if others > 0 else 0.0
        if other_mean > 0:
            ratios[name] = first_mean / other_mean
        else:
            ratios[name] = float("inf") if first_mean > 0 else 0.0
    return ratios


def sink_modules(stats: Statistics, threshold: float | None) -> list[str]:
    """The modules whose first-token energy ratio exceeds `threshold`, in order (none when `threshold` is `None`).

    Args:
        stats ([`Statistics`]): Holds `first_token_output_energy` (unless `threshold` is `None`).
        threshold (`float`, *optional*): Ratio (above 1) beyond which a module is a sink module.
    """
    if threshold is None:
        return []
    return [name for name, ratio in first_token_energy_ratios(stats).items() if ratio > threshold]


def log_sink_modules(stats: Statistics, sinks: list[str], threshold: float) -> None:
    """Log which modules stay dense as attention sinks, with their ratios."""
    if not sinks:
        return
    ratios = first_token_energy_ratios(stats)
    logger.info(
        "Keeping %d attention-sink module(s) dense (first token's output energy over %s times a later token's): %s.",
        len(sinks),
        threshold,
        ", ".join(f"{name} ({ratios[name]:.0f}x)" for name in sinks),
    )
