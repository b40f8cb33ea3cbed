"""Check an FWSVD checkpoint's files against its `config.json` before transformers reads a single weight.

transformers treats several broken checkpoints leniently: a module whose weights are missing from the file is
randomly initialised with only a load report, a truncated safetensors file fails with an error that does not name the
file, and an unknown `quant_method` (a typo) is skipped with a warning. For a compressed model each of these means
random or wrong weights behind a model that looks fine, so we turn them into errors that name the file or module.
We never unpickle anything: pickle files (`pytorch_model.bin`) are refused.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

__all__ = [
    "check_factors_finite",
    "check_loading_info",
    "check_local_checkpoint",
    "check_weights_match_ranks",
    "read_tensor_shapes",
]

logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_REEXPORT = "Re-export it with `save_pretrained` from the compressed model."


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (no tensor data is read).

    Raises:
        `ValueError`: Naming the file when it is not a complete, valid safetensors file.
    """
    path = os.fspath(path)
    if path.endswith(_PICKLE_SUFFIXES):
        raise ValueError(
            f"Refusing to load {path!r}: it is a pickle file, and hf_fwsvd never unpickles checkpoints (pickle can "
            f"run arbitrary code). FWSVD checkpoints are safetensors only. {_REEXPORT}"
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"Weights file {path!r} is missing: the checkpoint is incomplete (an interrupted download or copy?). "
            "Download it again (`force_download=True`) or re-save the checkpoint."
        )
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"Weights file {path!r} is not a valid safetensors file ({error}). It is truncated or corrupt (an "
            "interrupted download, copy or save?): download it again (`force_download=True`) or re-save the "
            "checkpoint."
        ) from error


def _model_key_names(keys: list[str], model: nn.Module) -> dict[str, str]:
    """Checkpoint key -> the key `model` uses for it, renamed exactly as transformers renames it on load: its
    conversion mapping (ViT saves ``vit.layers.0.attention.k_proj`` as ``vit.encoder.layer.0.attention.attention.key``)
    and the base-model prefix (a base model reading a `*For<Task>` checkpoint drops ``bert.``, a task model reading a
    base one adds it).

    Fast path: keys that are all names of the model's parameters and buffers are used as they are (a compressed
    checkpoint reloaded into its own class: `save_pretrained` writes legacy names, which the model does not have,
    only for models whose conversion mapping renames them). Building the mapping and the state dict and renaming
    every key took 45 ms of a 430 ms SmolLM2 reload (210 modules, 2026-12-04); the set test takes about 2 ms.
    """
    own = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    own.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    if own.issuperset(keys):
        return {key: key for key in keys}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers without conversion mappings: keys are used as saved
        return {key: key for key in keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
    converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    return {key: rename_source_key(key, renamings, converters, prefix, expected)[0] for key in keys}


def check_weights_match_ranks(
    model: nn.Module, ranks: dict[str, int], checkpoint_files: Iterable[str], factor_dtype: str | None = None
) -> None:
    """Raise unless the weight files hold exactly the factor shapes the rank map built into `model`'s skeleton.

    Args:
        model (`nn.Module`): The skeleton, after `build_low_rank_skeleton` (compressed modules are `LowRankLinear`).
        ranks (`dict[str, int]`): The checkpoint's rank map.
        checkpoint_files (`Iterable[str]`): The resolved weight files (one, or every shard).
        factor_dtype (`str`, *optional*): `"int8"` when the factors are stored as int8 data, scales and zero points.

    Raises:
        `ValueError`: Naming the modules whose factors are missing or mis-shaped, and any factorised module that the
            rank map lacks (transformers would load it as a randomly initialised dense layer).
    """
    files = list(checkpoint_files)
    shapes: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    for path in files:
        for key, shape in read_tensor_shapes(path).items():
            shapes[key] = shape
            origin[key] = os.path.basename(path)
    names = _model_key_names(list(shapes), model)
    shapes = {names[key]: shape for key, shape in shapes.items()}
    origin = {names[key]: path for key, path in origin.items()}
    problems = []
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        expected = {
            f"{name}.down.weight": (rank, module.in_features),
            f"{name}.up.weight": (module.out_features, rank),
        }
        if factor_dtype is not None:  # int8 data, one scale and zero point per row (see `factor_storage`)
            expected = {
                f"{key}_{part}": shape if part == "qdata" else (shape[0], 1)
                for key, shape in expected.items()
                for part in ("qdata", "scale", "zero_point")
            }
        if module.up.bias is not None:
            expected[f"{name}.up.bias"] = (module.out_features,)
        for key, shape in expected.items():
            if key not in shapes:
                problems.append(f"`{key}` is missing from the weights")
            elif shapes[key] != shape:
                problems.append(
                    f"`{key}` has shape {list(shapes[key])} in {origin[key]}, but rank {rank} for `{name}` needs "
                    f"{list(shape)}"
                )
    down_key = ".down.weight" if factor_dtype is None else ".down.weight_qdata"
    factorised = sorted({key.removesuffix(down_key) for key in shapes if key.endswith(down_key)})
    for name in factorised:
        if name not in ranks:
            problems.append(
                f"`{name}` is factorised in the weights but missing from the rank map (it would load as a randomly "
                "initialised dense layer)"
            )
    if problems:
        where = os.path.dirname(files[0]) if files else "the checkpoint"
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"The FWSVD checkpoint in {where} does not match the rank map in its config.json "
            f"(`quantization_config.ranks`): {'; '.join(problems[:5])}{more}. The config.json was edited or belongs "
            f"to another checkpoint. {_REEXPORT}"
        )


def check_factors_finite(model: nn.Module) -> None:
    """Raise naming the first compressed module whose loaded factors hold NaN/Inf (meta tensors are skipped).

    Fused for speed (it runs on every reload): one fp32-accumulated sum per factor, then a single finiteness test
    over all the sums. NaN and Inf always reach a sum (``inf - inf`` is NaN), so a finite sum proves its factor
    finite; only when some sum is not (a bad value, or a sum that overflowed) is each factor checked element by
    element, which keeps the verdict exact. ``torch.isfinite(w).all()`` on every factor took 11 ms of a 40 ms MiniLM
    reload (a dense load: 22 ms); the sums take about 2 ms (benchmarks/README.md, "Performance and scale").
    """
    from .layers import LowRankLinear

    factors = [
        (name, part, getattr(module, part).weight)
        for name, module in model.named_modules()
        if isinstance(module, LowRankLinear)
        for part in ("down", "up")
    ]
    factors = [
        item
        for item in factors
        if item[2].device.type != "meta" and item[2].is_floating_point() and not hasattr(item[2], "qdata")
    ]  # int8 factors: their scales are checked when they are built (`factor_storage`)
    if not factors:
        return
    with torch.no_grad():
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, _, weight in factors:
            by_device.setdefault(weight.device, []).append(weight.sum(dtype=torch.float32))
        # one host transfer per device
        if all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values()):
            return
        for name, part, weight in factors:
            if not torch.isfinite(weight).all():
                raise ValueError(
                    f"The checkpoint's `{name}.{part}.weight` holds NaN/Inf values: the weights file is corrupt or "
                    f"was saved from a broken model. {_REEXPORT}"
                )


def _looks_like_fwsvd(quantization: dict[str, Any]) -> bool:
    method = str(quantization.get("quant_method", "")).lower()
    weights_file = str(quantization.get("weights_file") or "")
    return (
        "ranks" in quantization
        or weights_file.startswith("model.fwsvd")
        or bool(difflib.get_close_matches(method, ["fwsvd"], n=1, cutoff=0.7))
    )


_REDOWNLOAD = (
    "Download or copy it again (`force_download=True`), or re-save it with `save_pretrained` from the compressed "
    "model."
)


def _read_index(directory: str, index_name: str, shown: str) -> dict[str, str]:
    """The `weight_map` of a shard index, checked: valid JSON, a non-empty name -> shard map, every shard present."""
    path = os.path.join(directory, index_name)
    shown_path = os.path.join(shown, index_name)
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except ValueError as error:
        raise ValueError(
            f"The shard index {shown_path!r} is not valid JSON ({error}): it is truncated or corrupt. {_REDOWNLOAD}"
        ) from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(
            f"The shard index {shown_path!r} has no `weight_map` (tensor name -> shard file), so its shards cannot be "
            f"found. {_REDOWNLOAD}"
        )
    missing = sorted({name for name in weight_map.values() if not os.path.isfile(os.path.join(directory, name))})
    if missing:
        raise ValueError(
            f"The shard index {shown_path!r} lists {len(missing)} shard(s) missing from {shown!r}: "
            f"{', '.join(missing[:5])}. The checkpoint is incomplete. {_REDOWNLOAD}"
        )
    return weight_map


def check_loading_info(
    model: nn.Module, info: dict[str, Any], shown: str, directory: str | None = None, subfolder: str = ""
) -> None:
    """Refuse an FWSVD checkpoint that lacks tensors the model needs (transformers would initialise them randomly).

    Only a new task head is allowed to be missing, as in transformers: loading a `*For<Task>` class from a
    checkpoint saved as another class (e.g. the base model) whose missing tensors all sit outside the base model.

    Args:
        model (`nn.Module`): The loaded model.
        info (`dict`): transformers' loading info (`output_loading_info=True`).
        shown (`str`): The checkpoint as the user named it (folder or Hub id), for the message.
        directory (`str`, *optional*): The local folder actually read (to list shards the index does not name).
        subfolder (`str`, *optional*): `from_pretrained`'s `subfolder`.

    Raises:
        `ValueError`: Naming the checkpoint, the weight files, the missing tensors and the fix.
    """
    missing = sorted(info.get("missing_keys") or [])
    if not missing:
        return
    config = getattr(model, "config", None)
    saved_as = (getattr(config, "architectures", None) or [None])[0]
    prefix = getattr(model, "base_model_prefix", "") or ""
    in_base = any(key.startswith(prefix + ".") for key in missing)
    if saved_as not in (None, type(model).__name__) and prefix and not in_base:
        logger.warning(
            "%s holds a %s checkpoint: the %s head (%s) is not in it and is newly initialised. Train it before use.",
            shown,
            saved_as,
            type(model).__name__,
            ", ".join(missing[:5]),
        )
        return
    quantization = getattr(config, "quantization_config", None)
    weights_file = getattr(quantization, "weights_file", None) or "model.fwsvd.safetensors"
    hint = ""
    if directory is not None and weights_file.endswith(".index.json"):
        folder = os.path.join(directory, subfolder)
        try:
            listed = set(_read_index(folder, weights_file, shown).values())
            unlisted = sorted(
                name for name in os.listdir(folder) if name.startswith("model.fwsvd-") and name not in listed
            )
        except (OSError, ValueError):
            unlisted = []
        if unlisted:
            hint = f" The index {weights_file} does not list the shard(s) {', '.join(unlisted[:5])}."
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise ValueError(
        f"The FWSVD checkpoint {shown!r} is incomplete: {len(missing)} tensor(s) that {type(model).__name__} needs "
        f"are not in its weights ({weights_file}): {', '.join(missing[:5])}{more}. They would be randomly "
        f"initialised.{hint} {_REDOWNLOAD}"
    )


def check_local_checkpoint(path: str | os.PathLike, subfolder: str = "", shown_as: str | None = None) -> None:
    """Checks on a local checkpoint directory before `from_pretrained` reads it (remote repos are checked later, by
    the quantizer, on the downloaded files).

    Raises:
        `ValueError`: When `config.json` names an unregistered `quant_method` but is an FWSVD checkpoint (a typo such
            as `"fwsvdd"`, which transformers would skip with a warning), or when an FWSVD checkpoint has only pickle
            weights (refused, never unpickled).
    """
    directory = os.path.normpath(os.path.join(os.fspath(path), subfolder))
    shown = os.path.normpath(os.path.join(os.fspath(shown_as if shown_as is not None else path), subfolder))
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except ValueError as error:
        raise ValueError(
            f"{os.path.join(shown, 'config.json')} is not valid JSON ({error}): it is truncated or corrupt. Restore "
            "it from the original checkpoint, or re-save the model with `save_pretrained`."
        ) from error
    except OSError:
        return  # transformers reports an unreadable config.json itself
    config_path = os.path.join(shown, "config.json")
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict):
        return
    method = quantization.get("quant_method")
    if method != "fwsvd":
        if _looks_like_fwsvd(quantization):
            raise ValueError(
                f"{config_path} has `quantization_config.quant_method` = {method!r}, which no quantization method is "
                "registered under, but the checkpoint looks like an FWSVD one (it has a rank map or FWSVD weight "
                "file). transformers would skip the quantization and fail or load random weights. Fix config.json: "
                'set "quant_method": "fwsvd".'
            )
        return
    names = os.listdir(directory)
    weights_file = quantization.get("weights_file")
    if isinstance(weights_file, str) and weights_file.endswith(".index.json") and weights_file in names:
        _read_index(directory, weights_file, shown)
    has_weights = weights_file is not None and os.path.isfile(os.path.join(directory, weights_file))
    has_safetensors = any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names)
    pickles = sorted(name for name in names if name.endswith(_PICKLE_SUFFIXES))
    if pickles and not has_weights and not has_safetensors:
        raise ValueError(
            f"{shown} is an FWSVD checkpoint with only pickle weights ({', '.join(pickles)}). hf_fwsvd never "
            "unpickles checkpoints (pickle can run arbitrary code) and FWSVD checkpoints are safetensors only: "
            f"convert the file to safetensors in a trusted environment. {_REEXPORT}"
        )
