"""Whether long steps show progress bars, for steps the pipeline reaches through a method's hooks.

`compress(..., show_progress=False)` passes its flag to the steps it calls directly. A method's `refine_model` hook
(e.g. SVD-LLM's sequential update, minutes to an hour on a causal LM) has a fixed signature, so the pipeline sets the
flag here for the duration of the hook instead (a context variable: each thread and task sees its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["progress_bars", "progress_enabled"]

_ENABLED: ContextVar[bool] = ContextVar("hf_fwsvd_progress_bars", default=True)


def progress_enabled() -> bool:
    """Whether progress bars are shown here (`True` unless inside `progress_bars(False)`)."""
    return _ENABLED.get()


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Inside the block, [`progress_enabled`] returns `enabled`; restored on exit.

    Args:
        enabled (`bool`): Show progress bars in the steps run inside the block.
    """
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)
