"""Load, save and check precomputed importances (module name -> one value per input feature)."""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .factorize import validate_importance

__all__ = ["check_importances", "load_importances", "save_importances"]


def save_importances(importances: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write importances to a safetensors file atomically (temp file, then rename), so a long estimation is kept.

    Args:
        importances (`dict[str, torch.Tensor]`): Module name -> importance vector.
        path (`str` or `os.PathLike`): Destination `.safetensors` file.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    tensors = {name: value.detach().to(torch.float32).contiguous().cpu() for name, value in importances.items()}
    save_file(tensors, tmp, metadata={"format": "pt", "content": "hf_fwsvd importances"})
    os.replace(tmp, path)


def load_importances(source: Any) -> dict[str, torch.Tensor]:
    """Importances from a dict or a safetensors file path.

    Raises:
        `ValueError`: When the file is missing, corrupt or not a safetensors file.
    """
    if isinstance(source, dict):
        return {name: torch.as_tensor(value) for name, value in source.items()}
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"Importances file {path!r} does not exist.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"Importances file {path!r} is not a readable safetensors file: {error}") from error


def check_importances(importances: dict[str, torch.Tensor], in_features: dict[str, int]) -> None:
    """Raise a `ValueError` naming the module when an importance is missing, mis-shaped, NaN/Inf or all zero."""
    missing = [name for name in in_features if name not in importances]
    if missing:
        raise ValueError(
            f"Importances are missing for {len(missing)} targeted module(s), e.g. `{missing[0]}`. They were computed "
            "for another model or other target modules; recompute them or adjust `target_modules`."
        )
    for name, size in in_features.items():
        validate_importance(importances[name], size, name, matrix_ok=False)
