"""The resumable statistics cache (`FWSVDConfig.importances_cache`): one safetensors file holding every statistic a
run collected, written atomically by the main process before any layer is factorised.

The row Fisher is stored under the bare module names, so the file is also a valid `importances` file; any other
statistic ``s`` of module ``m`` is stored under ``"s/m"``. The file's metadata records the Fisher estimator
(`FWSVDConfig.fisher_estimator`) its gradient statistics were estimated with, so that a run with another estimator
does not reuse them (see `hf_fwsvd.methods.known_statistics`).
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..importances import load_importances
from .base import Statistics

__all__ = ["cache_fisher_estimator", "load_statistics_cache", "save_statistics_cache"]

ROW_FISHER = "row_fisher"
ESTIMATOR_KEY = "fisher_estimator"


def save_statistics_cache(stats: Statistics, path: str | os.PathLike, fisher_estimator: str | None = None) -> None:
    """Write `stats` to `path` atomically (a temporary file, then a rename).

    Args:
        stats ([`Statistics`]): What to save.
        path (`str` or `os.PathLike`): The cache file.
        fisher_estimator (`str`, *optional*): The estimator of its gradient statistics, recorded in the metadata.
    """
    path = os.fspath(path)
    tensors = {}
    for key, table in stats.items():
        for name, value in table.items():
            tensors[name if key == ROW_FISHER else f"{key}/{name}"] = (
                value.detach().to(torch.float32).contiguous().cpu()
            )
    tmp = f"{path}.tmp-{os.getpid()}"
    metadata = {"format": "pt", "content": "hf_fwsvd importances"}
    if fisher_estimator is not None:
        metadata[ESTIMATOR_KEY] = fisher_estimator
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_statistics_cache(path: str | os.PathLike) -> Statistics:
    """Read a cache written by [`save_statistics_cache`] (or a plain importances file: its row Fisher only).

    Raises:
        `ValueError`: When the file is missing, corrupt or not a safetensors file.
    """
    stats = Statistics()
    for key, value in load_importances(os.fspath(path)).items():
        statistic, _, name = key.partition("/") if "/" in key else (ROW_FISHER, "", key)
        stats.setdefault(statistic, {})[name] = value
    return stats


def cache_fisher_estimator(path: str | os.PathLike) -> str | None:
    """The Fisher estimator recorded in the cache at `path`, or `None` (a plain importances file, or a cache written
    before the estimator was recorded)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(ESTIMATOR_KEY)
    except (SafetensorError, OSError):
        return None
