"""The collapse guard: a loud warning when compression wrecked the model it was asked to shrink.

Whenever a compression is evaluated before and after (`hf-fwsvd compress --eval-data`, or
`hf_fwsvd.model_card.record_evaluation(model, after, dataset, before=...)` from Python), the metrics are checked:

- **perplexity** collapsed when the compressed perplexity is more than `PERPLEXITY_FACTOR` times the dense one;
- **accuracy** collapsed when it is within `CHANCE_MARGIN` of chance (``1 / num_labels``) while the dense model was
  clearly above it.

A collapse is logged as a warning that says what to try, stored on the evaluation record so the model card shows it,
and made an error by ``hf-fwsvd compress --fail-on-collapse`` (exit code 1, nothing saved).
"""

from __future__ import annotations

import logging
from typing import Any

from .defaults import CAUSAL_LM_METHOD

__all__ = ["CHANCE_MARGIN", "PERPLEXITY_FACTOR", "check_collapse"]

logger = logging.getLogger(__name__)

# A compressed perplexity above this multiple of the dense one counts as a collapse.
PERPLEXITY_FACTOR = 3.0
# An accuracy within this (absolute) of chance counts as a collapse when the dense model was further from it.
CHANCE_MARGIN = 0.05

_TRY_CAUSAL = (
    f'Try `method="{CAUSAL_LM_METHOD}"` with `param_budget=` (global allocation, `allocation_power=1.0`), which is '
    f"the default for causal LMs when no method is given (CLI: `--method {CAUSAL_LM_METHOD} --param-budget 0.8 "
    "--allocation-power 1`), keep more weights, or run a recovery fine-tune (`hf_fwsvd.finetune(..., lora=True)`)."
)
# When the causal-LM default already ran, naming it again is no advice: left are the data, the budget, a fine-tune.
_TRY_CAUSAL_DEFAULT = (
    f"The method is already the causal-LM default (`{CAUSAL_LM_METHOD}`). Calibrate on more text of the kind the "
    "model will serve (thousands of tokens; CLI: `--num-samples`, `--max-length`), keep more weights, or run a "
    "recovery fine-tune (`hf_fwsvd.finetune(..., lora=True)`)."
)
_TRY_CLASSIFIER = (
    'Try keeping more weights, `method="whiten"`, or `param_budget=` with the Fisher allocation, and run a recovery '
    "fine-tune (`hf_fwsvd.finetune`)."
)


def check_collapse(
    before: dict[str, Any] | None, after: dict[str, Any], num_labels: int | None = None, method: str | None = None
) -> str | None:
    """The collapse warning for these dense (`before`) and compressed (`after`) metrics, or `None` when healthy.

    Args:
        before (`dict`, *optional*): Metrics of the dense model (`perplexity` and/or `accuracy`); without them only
            an accuracy at chance can be detected, which needs `num_labels`.
        after (`dict`): Metrics of the compressed model.
        num_labels (`int`, *optional*): Number of classes, for the chance level of `accuracy`.
        method (`str`, *optional*): The compression method that ran; the advice does not name it again.

    Returns:
        `str` or `None`: The warning text.
    """
    before = before or {}
    dense, compressed = before.get("perplexity"), after.get("perplexity")
    if _number(compressed) and _number(dense) and dense > 0 and compressed > PERPLEXITY_FACTOR * dense:
        return (
            f"Compression collapsed the model: perplexity {compressed:.4g} is {compressed / dense:.1f}x the dense "
            f"model's {dense:.4g} (the guard fires above {PERPLEXITY_FACTOR:g}x). "
            + (_TRY_CAUSAL_DEFAULT if method == CAUSAL_LM_METHOD else _TRY_CAUSAL)
        )
    accuracy = after.get("accuracy")
    if _number(accuracy) and num_labels and num_labels > 1:
        chance = 1 / num_labels
        dense_accuracy = before.get("accuracy")
        dense_above = not _number(dense_accuracy) or dense_accuracy > chance + CHANCE_MARGIN
        if accuracy <= chance + CHANCE_MARGIN and dense_above:
            dense_text = f" (dense {dense_accuracy:.4f})" if _number(dense_accuracy) else ""
            return (
                f"Compression collapsed the model: accuracy {accuracy:.4f}{dense_text} is at chance level "
                f"({chance:.4f} for {num_labels} labels). {_TRY_CLASSIFIER}"
            )
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
