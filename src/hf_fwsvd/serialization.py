"""Saving compressed models: atomic writes, FWSVD weight-file names, and the loader hook for them.

The factorised weights are written as ``model.fwsvd.safetensors`` (sharded: ``model.fwsvd-00001-of-0000N.safetensors``
plus ``model.fwsvd.safetensors.index.json``), never as ``model.safetensors``. Plain transformers without hf_fwsvd
skips the unknown ``fwsvd`` quantization method; if the weights had the usual name it would then load a dense model
whose compressed layers are randomly initialised, with only a warning. With the FWSVD name it finds no weights and
raises instead. With hf_fwsvd imported, the quantizer points transformers at the FWSVD file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

from .atomic_dir import publish, staging_directory, writer_lock

__all__ = ["WEIGHTS_INDEX_NAME", "WEIGHTS_NAME", "finalize_checkpoint", "is_fwsvd_model", "save_atomically"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.fwsvd.safetensors"
WEIGHTS_INDEX_NAME = "model.fwsvd.safetensors.index.json"
_PLAIN_WEIGHTS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_PLAIN_INDEX = "model.safetensors.index.json"
_PICKLE_WEIGHTS = re.compile(r"^pytorch_model(-\d{5}-of-\d{5})?\.bin$")


def is_fwsvd_model(model: Any) -> bool:
    """Whether `model` carries FWSVD-compressed modules (it was compressed or loaded from an FWSVD checkpoint)."""
    from .quantizer import FWSVDHfQuantizer

    return isinstance(getattr(model, "hf_quantizer", None), FWSVDHfQuantizer)


def _rename_weights(directory: str) -> str:
    """Rename transformers' weight files in `directory` to the FWSVD names; returns the name to load."""
    index_path = os.path.join(directory, _PLAIN_INDEX)
    renamed = {}
    for filename in sorted(os.listdir(directory)):
        match = _PLAIN_WEIGHTS.match(filename)
        if match:
            new_name = f"model.fwsvd{match.group(1) or ''}.safetensors"
            os.replace(os.path.join(directory, filename), os.path.join(directory, new_name))
            renamed[filename] = new_name
    if not renamed:
        raise OSError(f"save_pretrained wrote no safetensors weights in {directory}; cannot finalise the checkpoint.")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        index["weight_map"] = {key: renamed.get(value, value) for key, value in index["weight_map"].items()}
        with open(os.path.join(directory, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
        os.remove(index_path)
        return WEIGHTS_INDEX_NAME
    return WEIGHTS_NAME


def finalize_checkpoint(directory: str) -> None:
    """Turn a transformers save of a compressed model into an FWSVD checkpoint (weight names, config entries)."""
    weights_file = _rename_weights(directory)
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("transformers_weights", None)
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "fwsvd":
        raise OSError(f"{config_path} has no fwsvd quantization_config; refusing to write an inconsistent checkpoint.")
    quantization["weights_file"] = weights_file
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _same_path(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _check_not_source(model: Any, save_directory: str) -> None:
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or ""
    if source and os.path.isdir(source) and _same_path(source, save_directory):
        raise ValueError(
            f"Refusing to save into {save_directory!r}: it is the checkpoint this model was loaded from, and "
            "overwriting it would destroy the source. Save to a new directory."
        )


def _is_checkpoint_file(name: str) -> bool:
    """Weight files and indices a new save replaces (stale ones would otherwise be loaded instead of ours)."""
    return bool(
        _PLAIN_WEIGHTS.match(name)
        or _PICKLE_WEIGHTS.match(name)
        or name in (_PLAIN_INDEX, WEIGHTS_INDEX_NAME, "pytorch_model.bin.index.json")
        or name.startswith("model.fwsvd")
    )


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _carry_over(staging: str, save_directory: str) -> None:
    """Copy (hard-link) the files of an existing `save_directory` that are not part of the checkpoint (tokenizer,
    README, ...) into `staging`; its old weight files are dropped."""
    if not os.path.isdir(save_directory):
        return
    written = set(os.listdir(staging))
    kept = []
    for name in sorted(os.listdir(save_directory)):
        if name in written or _is_checkpoint_file(name):
            continue
        source, destination = os.path.join(save_directory, name), os.path.join(staging, name)
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, destination)
        kept.append(name)
    replaced = sorted(written & set(os.listdir(save_directory)))
    if replaced or kept:
        logger.warning(
            "Saving into the existing directory %s: replacing %s; keeping %s.",
            save_directory,
            ", ".join(replaced) or "no file",
            ", ".join(kept) or "no other file",
        )


def _move_into(staging: str, save_directory: str) -> None:
    """Put the finished checkpoint in `staging` at `save_directory` atomically (see `atomic_dir.publish`): a reader
    or a crash sees the old folder or the new one, never a mix or nothing. Files of an existing folder that are not
    part of the checkpoint are carried over; its old weight files are dropped."""
    with writer_lock(save_directory):
        _carry_over(staging, save_directory)
    publish(staging, save_directory)


def _check_writable(directory: str, save_directory: str) -> None:
    if not os.access(directory, os.W_OK) or not os.stat(directory).st_mode & 0o222:
        raise PermissionError(
            f"Cannot save into {save_directory!r}: {directory!r} is read-only. Choose a writable output directory or "
            "make it writable (chmod u+w)."
        )


def _check_no_added_bias(model: Any) -> None:
    """Refuse a model whose factors gained a bias its architecture lacks (`sequential_update(intercept=True)`): the
    checkpoint rebuilds each module from the architecture, so the bias would not load."""
    added = [name for name, module in model.named_modules() if getattr(module, "bias_added", False)]
    if added:
        more = f" (and {len(added) - 3} more)" if len(added) > 3 else ""
        raise ValueError(
            f"Cannot save: `{'`, `'.join(added[:3])}`{more} carry a bias fitted by "
            f"`sequential_update(intercept=True)` that {type(model).__name__} has no place for, so the checkpoint "
            "could not load it. Run the update without `intercept` to save the model."
        )


def _check_not_cwd(save_directory: str) -> None:
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        return
    if cwd == save_directory or cwd.startswith(save_directory + os.sep):
        raise ValueError(
            f"Refusing to save into {save_directory!r}: it is (or contains) the current working directory, which the "
            "save replaces as a whole. Change to another directory (`cd ..`) or save somewhere else."
        )


def save_atomically(
    model: Any,
    save_directory: str | os.PathLike,
    original_save: Callable[..., Any],
    extra_writers: list[Callable[[Any, str], None]] | None = None,
    **kwargs: Any,
) -> None:
    """Save a compressed model through transformers into a staging directory, finalise it, then swap it in place.

    A failure or a kill at any point leaves `save_directory` as it was (or, after the swap, the new checkpoint),
    never a half-written checkpoint or no checkpoint; a concurrent reader sees the old or the new folder whole (see
    `atomic_dir`). Concurrent saves into one directory are serialised with a lock file next to it.

    Args:
        model: The compressed `PreTrainedModel`.
        save_directory (`str` or `os.PathLike`): Destination directory (created if missing).
        original_save (`Callable`): transformers' own `save_pretrained` (unwrapped).
        extra_writers (`list[Callable]`, *optional*): Called as `writer(model, staging_dir)` before the move (model
            card, ...).
        kwargs: Passed to `original_save`.
    """
    save_directory = os.path.realpath(os.fspath(save_directory))
    if kwargs.get("variant"):
        raise ValueError(
            f"`save_pretrained(variant={kwargs['variant']!r})` is not supported for FWSVD-compressed models: their "
            "weights are always saved as model.fwsvd.safetensors. Save each variant into its own directory instead."
        )
    if os.path.exists(save_directory) and not os.path.isdir(save_directory):
        raise ValueError(f"`save_directory` {save_directory!r} is a file, not a directory.")
    _check_no_added_bias(model)
    _check_not_source(model, save_directory)
    _check_not_cwd(save_directory)
    parent = os.path.dirname(save_directory)
    os.makedirs(parent, exist_ok=True)
    _check_writable(parent, save_directory)
    if os.path.isdir(save_directory):
        _check_writable(save_directory, save_directory)
    with staging_directory(save_directory) as staging:
        original_save(model, staging, **kwargs)
        finalize_checkpoint(staging)
        for writer in extra_writers or []:
            writer(model, staging)
        _move_into(staging, save_directory)
    logger.info("Saved FWSVD checkpoint to %s", save_directory)
