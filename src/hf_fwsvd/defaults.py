"""What `compress` does when the config leaves the method open, and the warning for a known-bad choice.

`FWSVDConfig(method=None)` (the default) is resolved per model when compression starts:

- **Causal LMs** get the best setting measured on a real one (SmolLM2-135M, `benchmarks/causal_lm.py`, chosen on a
  development text, the 1980-1989 State of the Union addresses): `method="kfac_svdllm"` (the truncation weighted by
  a Kronecker-factored Fisher, input side ``E[|g|^2 x x^T]`` and output side ``E[g g^T]``, then SVD-LLM's sequential
  least-squares update of the `up` factors) with the global allocation at `allocation_power=1.0`. At 80% of the
  block weights kept it gave development perplexity 39.7 (dense 24.7), against 42.2 for the previous default
  `fisher_svdllm` (one-sided Fisher-weighted whitening + update) and 47.2 for `svdllm`; on the held-out texts 38.0 /
  167.0 (SOTU 2000-2021 / Moby Dick; dense 24.2 / 63.8; `fisher_svdllm` 41.9 / 183.7). It also won on the development
  text at 60% kept (90.3 vs 94.6); with the genre-mix calibration it won at 80% and tied at 60% (benchmarks/README.md,
  "Kronecker-factored Fisher"). When no size was given
  either, `param_budget=CAUSAL_LM_BUDGET` (80% of the targeted weights kept) replaces the paper's
  `rank_ratio=0.33`, which keeps far fewer weights in an LLM's wide layers; an explicit size is kept as given.
  With a large calibration set (at least `LARGE_CALIBRATION_TOKENS` real tokens, counted once the statistics are in)
  the update is dropped: `method="kfac_whiten"`. On SmolLM2-135M with 131,072 and 262,144 tokens of a genre mix in
  512-token passages the update raised the development perplexity at both budgets (80% kept: 36.97 vs 36.53 and
  36.49 vs 35.99; 60%: 99.1 vs 92.1 and 94.2 vs 88.8) and took 8-45x the compression time; with 8,192 tokens it
  lowered it (39.7 vs 40.3), and with 32,768 it lowered it at 60% only (84.1 vs 91.3; 80%: 37.1 vs 36.6), so below
  the threshold the update stays (benchmarks/README.md, "The update and the calibration size").
  From `ALLOCATION_POWER_TOKENS` real tokens on (131,072, the same threshold) the allocation uses
  `allocation_power=LARGE_CALIBRATION_ALLOCATION_POWER` (0.75): with the genre mix it lowered the development
  perplexity at both sizes and budgets (80% kept: 35.60 vs 36.53 at 131,072 tokens and 35.28 vs 35.99 at 262,144;
  60%: 87.0 vs 92.1 and 85.6 vs 88.8; power 0.5: 38.2), and in each of three more random draws of 131,072 tokens from
  the same text (80%: -1.9% to -3.1%; 60%: -4.7% to -7.8%). At 32,768 tokens the evidence is split, so the power
  stays 1 there: on the benchmark's speech set 0.75 won (with the update 36.60 vs 37.06 at 80% kept and 78.0 vs 84.1
  at 60%), but on the CLI's default calibration (the first 32,768 tokens of the same addresses, 512-token blocks) it
  lost at 80% (39.22 vs 37.98); with 8,192 speech tokens it lost too (41.4 vs 39.7) (benchmarks/README.md, "The
  token-weighted update, and the allocation power" and "The allocation power at 32,768 tokens").
  At every calibration size the gradient-weighted moments weigh each calibration sequence's first token
  `CAUSAL_LM_FIRST_TOKEN_WEIGHT` (0.1) instead of 1 (`first_token_weight`, `hf_fwsvd.first_token_weight`): that token
  is the attention sink, and in every `v_proj` it carried 79% of the gradient weight. On the development text at 80%
  kept it gave 37.19 vs 39.66 with 8,192 speech tokens and the update, 33.63 +- 0.24 vs 35.08-35.72 with
  131,072 tokens of the genre mix (four draws, each 4.9-5.7% better; power 0.75, no update), and 35.79 vs 37.98 with
  the CLI's default calibration (32,768 tokens, with the update); at 60% kept 96.0 vs 102.2 (8,192 tokens, no update)
  and 76.4 +- 0.9 vs 84.1-88.2 (131,072, each draw 10-13% better). Weight 0 was worse than 0.1 in every cell, 0.03
  within 0.3% of it, 0.3 between 0.1 and 1 (benchmarks/README.md, "The first token's weight").
- **Every other model** gets the paper's `method="fwsvd"` (unchanged from earlier versions).

An explicit `method=` is never changed, nor an explicit `allocation_power=` (with no method, the rest of the default
still applies). Choosing plain `fwsvd` or `svd` with per-module (uniform) ranks for a causal
LM logs [`UNIFORM_CAUSAL_WARNING`]: on SmolLM2-135M at 80% of the weights those settings gave perplexity 13,384 and
3.9e7 (dense 24.2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .calibration import infer_task
from .config import FWSVDConfig

__all__ = [
    "ALLOCATION_POWER_TOKENS",
    "CAUSAL_LM_ALLOCATION_POWER",
    "CAUSAL_LM_BUDGET",
    "CAUSAL_LM_FIRST_TOKEN_WEIGHT",
    "CAUSAL_LM_LARGE_CALIBRATION_METHOD",
    "CAUSAL_LM_LAYERWISE_METHOD",
    "CAUSAL_LM_METHOD",
    "LARGE_CALIBRATION_ALLOCATION_POWER",
    "LARGE_CALIBRATION_TOKENS",
    "UNIFORM_CAUSAL_WARNING",
    "apply_large_calibration_defaults",
    "resolve_defaults",
]

logger = logging.getLogger(__name__)

CAUSAL_LM_METHOD = "kfac_svdllm"
# The same truncation without the model-level update, for block-by-block compression (which cannot run the update).
CAUSAL_LM_LAYERWISE_METHOD = "kfac_whiten"
CAUSAL_LM_BUDGET = 0.8
CAUSAL_LM_ALLOCATION_POWER = 1.0
# Each calibration sequence's first token (the attention sink) weighted this much in the gradient-weighted moments.
CAUSAL_LM_FIRST_TOKEN_WEIGHT = 0.1
# From this many real calibration tokens on, a defaulted causal-LM method skips the update (see the module docstring).
LARGE_CALIBRATION_TOKENS = 131_072
CAUSAL_LM_LARGE_CALIBRATION_METHOD = "kfac_whiten"
# From this many real calibration tokens on, a defaulted causal-LM allocation power becomes the one below (a separate
# decision from the method's; 32,768 was tried and its evidence was split, see the module docstring).
ALLOCATION_POWER_TOKENS = 131_072
LARGE_CALIBRATION_ALLOCATION_POWER = 0.75
UNIFORM_CAUSAL_WARNING = (
    "method={method!r} with the same rank rule in every module destroys causal LMs (measured on SmolLM2-135M at 80% "
    "of the weights: perplexity 13,384 for fwsvd and 3.9e7 for svd, dense 24.2). Leave `method` unset (the default "
    "for causal LMs: Kronecker-factored Fisher whitening and SVD-LLM's update with the global allocation), or use "
    "method='kfac_svdllm' (or 'fisher_svdllm', 'svdllm', 'kfac_whiten', 'whiten') with param_budget= and "
    "allocation_power=1.0."
)


def resolve_defaults(model: Any, config: FWSVDConfig, in_memory: bool = True) -> FWSVDConfig:
    """Fill in `config.method` (and, for a causal LM without a size, the budget) for `model`, in place.

    Args:
        model: The model about to be compressed, or its class (the class name tells the task).
        config ([`FWSVDConfig`]): A run copy of the user's config (see `FWSVDConfig.copy_for_run`).
        in_memory (`bool`, *optional*, defaults to `True`): `False` for block-by-block compression, which cannot run
            the model-level update: a causal LM then gets `kfac_whiten` (the same truncation, without the update).

    Returns:
        [`FWSVDConfig`]: `config` itself.
    """
    if isinstance(model, type):  # a model class (block-by-block compression builds no model first)
        causal = model.__name__.endswith(("ForCausalLM", "LMHeadModel"))
    else:
        causal = infer_task(model) == "causal-lm"
    if config.method is None:
        if causal:
            config.method = CAUSAL_LM_METHOD if in_memory else CAUSAL_LM_LAYERWISE_METHOD
            if config.size_defaulted and not config.rank_pattern:
                config.rank_ratio = None
                config.param_budget = CAUSAL_LM_BUDGET
            if config.param_budget is not None:
                config.allocation = config.allocation or "fisher"
                if config.allocation_power_defaulted:
                    config.allocation_power = CAUSAL_LM_ALLOCATION_POWER
            if config.first_token_weight is None:
                config.first_token_weight = CAUSAL_LM_FIRST_TOKEN_WEIGHT
            logger.info(
                "No method given for a causal LM: using method=%r%s and first_token_weight=%g (the best measured "
                "setting).",
                config.method,
                f" with param_budget={config.param_budget}, allocation_power={config.allocation_power}"
                if config.param_budget
                else "",
                config.first_token_weight,
            )
        else:
            config.method = "fwsvd"
    elif causal and config.method in ("fwsvd", "svd") and config.param_budget is None:
        logger.warning(UNIFORM_CAUSAL_WARNING.format(method=config.method))
    return config


def apply_large_calibration_defaults(config: FWSVDConfig, count_tokens: Callable[[], int]) -> None:
    """Adapt a defaulted causal-LM setting to the calibration set's size, in place: from `ALLOCATION_POWER_TOKENS`
    real tokens a defaulted allocation power becomes `LARGE_CALIBRATION_ALLOCATION_POWER`, and from
    `LARGE_CALIBRATION_TOKENS` the method becomes `CAUSAL_LM_LARGE_CALIBRATION_METHOD` (see the module docstring).

    Args:
        config ([`FWSVDConfig`]): The run config after `resolve_defaults`; call this only when the user gave no method.
        count_tokens (`Callable[[], int]`): Counts the calibration set's real tokens; called only when `config`
            holds the default causal-LM method.
    """
    if config.method != CAUSAL_LM_METHOD:
        return
    tokens = count_tokens()
    choices = []
    if tokens >= LARGE_CALIBRATION_TOKENS:
        config.method = CAUSAL_LM_LARGE_CALIBRATION_METHOD
        choices.append(f"method={config.method!r} (without SVD-LLM's update; from {LARGE_CALIBRATION_TOKENS} tokens)")
    tempered = config.param_budget is not None and config.allocation == "fisher" and config.allocation_power_defaulted
    if tokens >= ALLOCATION_POWER_TOKENS and tempered:
        config.allocation_power = LARGE_CALIBRATION_ALLOCATION_POWER
        choices.append(f"allocation_power={config.allocation_power} (from {ALLOCATION_POWER_TOKENS} tokens)")
    if choices:
        logger.info(
            "%d calibration tokens: using %s, which won with large calibration sets.", tokens, " and ".join(choices)
        )
