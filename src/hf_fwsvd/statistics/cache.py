"""The resumable statistics cache (`FWSVDConfig.importances_cache`): one safetensors file holding every statistic a
run collected, written atomically by the main process before any layer is factorised.

The row Fisher is stored under the bare module names, so the file is also a valid `importances` file; any other
statistic ``s`` of module ``m`` is stored under ``"s/m"``.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ..importances import load_importances
from .base import Statistics

__all__ = ["load_statistics_cache", "save_statistics_cache"]

ROW_FISHER = "row_fisher"


def save_statistics_cache(stats: Statistics, path: str | os.PathLike) -> None:
    """Write `stats` to `path` atomically (a temporary file, then a rename)."""
    path = os.fspath(path)
    tensors = {}
    for key, table in stats.items():
        for name, value in table.items():
            tensors[name if key == ROW_FISHER else f"{key}/{name}"] = (
                value.detach().to(torch.float32).contiguous().cpu()
            )
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata={"format": "pt", "content": "hf_fwsvd importances"})
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
