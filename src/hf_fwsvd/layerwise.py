"""Compress a checkpoint on disk block by block, never holding the dense model in memory while factorising.

`compress_layerwise` works in two phases:

1. **Statistics.** Whatever the method (and the Fisher allocation) needs from calibration data (see
   `hf_fwsvd.methods`): the row Fisher needs the gradient of the task loss, activation statistics a forward pass. They
   come from `FWSVDConfig.importances` or `importances_cache` when those hold them; otherwise they are collected
   **block by block** (`hf_fwsvd.statistics.blockwise`): the non-block weights are loaded, then each block's weights
   only while it runs: a forward pass through the blocks in order (keeping the hidden states at each block boundary,
   on the CPU, when gradients are needed), the loss and its gradient at the last boundary, then a backward pass
   through the blocks in reverse order, each block re-loaded and its forward pass recomputed. Peak memory: one block's
   weights and one batch's activations, the non-block weights, and the calibration hidden states at every block
   boundary (``blocks x tokens x hidden`` floats; one boundary for forward-only statistics). The statistics equal the
   in-memory collector's. With a `device_map` (or `max_memory` / `offload_folder`), under ``accelerate launch``, or
   for a model that is not a plain stack of blocks (shared blocks such as ALBERT's, encoder-decoder), the model is
   loaded instead (accelerate may offload it) and the statistics are collected in one pass (data-parallel under
   ``accelerate launch``). Either way they are saved to `importances_cache` if set, and freed before phase 2.
2. **Ranks.** From the rank rule, or under `param_budget` from the allocation, which reads each targeted weight from
   disk once (one at a time) to score its directions.
3. **Factorisation.** The model is only built on the `meta` device (shapes, target names, ranks). The source
   safetensors files are read with `safe_open` one transformer block at a time: each targeted weight is factorised
   as soon as it is read, the block's factors and untouched tensors are written as one output shard, and the block is
   dropped before the next one is read. Peak memory is about one block of dense weights plus its factors, plus the
   largest non-block tensor (usually the embedding), on top of the Python/torch baseline.

The result is an ordinary sharded FWSVD checkpoint (``model.fwsvd-0000k-of-0000n.safetensors`` and its index): it
holds the same tensors as `compress()` followed by `save_pretrained()` and loads with `from_pretrained`.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .config import FWSVDConfig
from .defaults import resolve_defaults
from .distributed import is_main_process, process_info
from .first_token_weight import reweigh_first_token
from .layerwise_statistics import blockwise_statistics
from .methods import CompressionMethod, collect_statistics, get_method, known_statistics, required_statistics
from .pipeline import budget_ranks, factorize_weight, module_report, new_report, overrides_refine_model
from .provenance import describe_calibration, hub_base_model, source_name
from .ranks import resolve_ranks
from .report import CompressionReport
from .serialization import WEIGHTS_INDEX_NAME
from .statistics import Statistics
from .statistics.blockwise import BlockwiseUnsupported
from .targets import find_target_modules

__all__ = ["compress_layerwise"]

logger = logging.getLogger(__name__)

_SOURCE_WEIGHTS = ("model.safetensors.index.json", "model.safetensors")
_NOT_COPIED_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def _model_class(config: Any, model_class: type | None) -> type:
    if model_class is not None:
        return model_class
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(
        f"Cannot tell which model class to build from config.architectures={names!r}; pass `model_class=` (for "
        "example `AutoModelForCausalLM` or `LlamaForCausalLM`)."
    )


def _weight_files(model_dir: str) -> dict[str, str]:
    """Checkpoint key -> safetensors file path."""
    index = os.path.join(model_dir, _SOURCE_WEIGHTS[0])
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        return {key: os.path.join(model_dir, name) for key, name in weight_map.items()}
    single = os.path.join(model_dir, _SOURCE_WEIGHTS[1])
    if not os.path.isfile(single):
        raise ValueError(
            f"{model_dir!r} has no {' or '.join(_SOURCE_WEIGHTS)}: `compress_layerwise` reads a dense safetensors "
            "checkpoint. Re-save the model with `save_pretrained(..., safe_serialization=True)`."
        )
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _blocks(skeleton: nn.Module) -> list[str]:
    """Names of the transformer blocks (entries of the outermost `nn.ModuleList`s), in model order."""
    blocks: list[str] = []
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(block + ".") for block in blocks):
            blocks.extend(f"{name}.{index}" if name else str(index) for index in range(len(module)))
    return blocks


def _group_keys(keys: list[str], blocks: list[str]) -> list[tuple[str, list[str]]]:
    """Split checkpoint keys into ``("", non-block keys)`` followed by one group per block, in model order."""
    known = set(blocks)
    groups: dict[str, list[str]] = {"": [], **{block: [] for block in blocks}}
    for key in keys:
        parts = key.split(".")
        group = next(
            (".".join(parts[:depth]) for depth in range(1, len(parts)) if ".".join(parts[:depth]) in known), ""
        )
        groups[group].append(key)
    return [(group, members) for group, members in groups.items() if members]


def _estimate(
    model_dir: str,
    model_cls: type,
    config: FWSVDConfig,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    load_kwargs: dict[str, Any],
    show_progress: bool,
) -> Statistics:
    """Load the dense model (possibly dispatched and offloaded) and collect the statistics `config` needs."""
    logger.info("Loading %s to collect calibration statistics (%s)", model_dir, load_kwargs or "no device_map")
    model = model_cls.from_pretrained(model_dir, **load_kwargs)
    try:
        return collect_statistics(model, config, find_target_modules(model, config), loss_fn, show_progress)
    finally:
        del model
        gc.collect()


def _statistics(
    model_dir: str,
    model_cls: type,
    model_config: Any,
    config: FWSVDConfig,
    targets: dict[str, nn.Module],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    load_kwargs: dict[str, Any],
    blockwise: dict[str, Any],
    show_progress: bool,
) -> Statistics:
    """The statistics `config` needs: from `importances` / `importances_cache` alone when they hold everything,
    otherwise from one calibration pass: block by block on one process without a `device_map`, else on the model
    loaded with `load_kwargs`."""
    needed = required_statistics(config)
    known = known_statistics(config, targets, needed)
    if all(key in known for key in needed):
        return known.subset(needed, targets)
    if not process_info().is_distributed and not set(load_kwargs) - {"dtype"}:
        dtype = load_kwargs.get("dtype")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        try:
            return blockwise_statistics(
                model_cls, model_config, config, **blockwise, loss_fn=loss_fn,
                dtype=dtype if isinstance(dtype, torch.dtype) else None, show_progress=show_progress,
            )  # fmt: skip
        except BlockwiseUnsupported as error:
            logger.warning("%s Loading the whole model for the calibration pass instead.", error)
    return _estimate(model_dir, model_cls, config, loss_fn, load_kwargs, show_progress)


def _target_weight(
    name: str, targets: dict[str, nn.Module], files: dict[str, str], handles: dict[str, Any]
) -> torch.Tensor:
    """The dense ``out x in`` weight of target `name`, read from its safetensors file (GPT-2's Conv1D transposed)."""
    path = files[f"{name}.weight"]
    if path not in handles:
        handles[path] = safe_open(path, framework="pt")
    tensor = handles[path].get_tensor(f"{name}.weight")
    return tensor.T if type(targets[name]).__name__ == "Conv1D" else tensor


def _target_weights(targets: dict[str, nn.Module], files: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every target's weight, one at a time, in model order (for the rank allocation)."""
    handles: dict[str, Any] = {}
    try:
        for name in targets:
            yield name, _target_weight(name, targets, files, handles)
    finally:
        handles.clear()


def _factorise_group(
    keys: list[str],
    files: dict[str, str],
    handles: dict[str, Any],
    targets: dict[str, nn.Module],
    ranks: dict[str, int],
    method: CompressionMethod,
    stats: Statistics,
    config: FWSVDConfig,
    report: CompressionReport,
) -> dict[str, torch.Tensor]:
    """Read one block's tensors, replace each factorised weight by its factors (and bias by ``up.bias``)."""
    tensors: dict[str, torch.Tensor] = {}
    for key in keys:
        module_name, _, leaf = key.rpartition(".")
        if module_name not in ranks:  # not targeted, or left dense by the allocation
            tensors[key] = handles[files[key]].get_tensor(key)
            continue
        if leaf == "bias":
            bias = tensors[f"{module_name}.up.bias"] = handles[files[key]].get_tensor(key)
            report.module_bytes_before += bias.numel() * bias.element_size()
            report.module_bytes_after += bias.numel() * bias.element_size()
            continue
        if leaf != "weight":
            raise ValueError(f"Unexpected tensor `{key}` in targeted module `{module_name}`; cannot factorise it.")
        weight = _target_weight(module_name, targets, files, handles)
        rank = ranks[module_name]
        factors, importance = factorize_weight(method, weight, rank, module_name, stats, config)
        down, up = factors.down.to(weight.dtype), factors.up.to(weight.dtype)
        tensors[f"{module_name}.down.weight"], tensors[f"{module_name}.up.weight"] = down, up
        report.modules.append(module_report(module_name, weight, up @ down, importance, rank))
        report.module_bytes_before += weight.numel() * weight.element_size()
        report.module_bytes_after += (down.numel() + up.numel()) * down.element_size()
    return tensors


def _check_keys(targets: dict[str, nn.Module], files: dict[str, str], model_dir: str) -> None:
    missing = [name for name in targets if f"{name}.weight" not in files]
    if missing:
        example = next(iter(files), "")
        raise ValueError(
            f"The checkpoint in {model_dir!r} has no `{missing[0]}.weight` ({len(missing)} targeted weights missing; "
            f"its keys look like `{example}`): its key names differ from the model's module names. Load it with "
            "`from_pretrained` and use `compress()` instead."
        )


def _finish_report(
    report: CompressionReport, targets: dict[str, nn.Module], params_before: int, config: FWSVDConfig
) -> None:
    order = {name: index for index, name in enumerate(targets)}
    report.modules.sort(key=lambda module: order[module.name])  # model order, as `compress()` reports them
    params_removed = sum(module.params_before - module.params_after for module in report.modules)
    report.model_params_after = params_before - params_removed
    report.base_model = config.base_model


def _saved_report(report: CompressionReport, config: FWSVDConfig) -> CompressionReport:
    """The report as `save_pretrained` writes it (`provenance.write_report`): calibration data described, no local
    path as the base model."""
    saved = copy.copy(report)
    saved.base_model = hub_base_model(report.base_model)
    if saved.calibration_data is None and get_method(config.method).needs_data:
        saved.calibration_data = describe_calibration(config.calibration_dataset)
    return saved


def compress_layerwise(
    model_dir: str | os.PathLike,
    save_directory: str | os.PathLike,
    config: FWSVDConfig,
    model_class: type | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str | int] | None = None,
    offload_folder: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    show_progress: bool = True,
) -> CompressionReport | None:
    """Compress the dense safetensors checkpoint in `model_dir` into an FWSVD checkpoint in `save_directory`, one
    transformer block at a time (see the module docstring for the memory this needs).

    Args:
        model_dir (`str` or `os.PathLike`): A local dense checkpoint (`config.json` plus `model.safetensors` or a
            sharded `model.safetensors.index.json`).
        save_directory (`str` or `os.PathLike`): Where the FWSVD checkpoint goes (written in a staging folder and moved
            into place, so a crash leaves no half-written checkpoint). Tokenizer and generation files are copied.
        config ([`FWSVDConfig`]): What to compress and how; give `importances` or `importances_cache` to skip or
            resume the Fisher estimation.
        model_class (`type`, *optional*): The model class (e.g. `AutoModelForSequenceClassification`); defaults to
            `config.architectures[0]` of the checkpoint.
        loss_fn (`Callable`, *optional*): Custom calibration loss `loss_fn(model, batch)`.
        device_map, max_memory, offload_folder, dtype (*optional*): By default the calibration statistics are
            collected block by block on the CPU (`dtype` casts the weights); any of the first three loads the whole
            model with `from_pretrained` for them instead, e.g. ``device_map="auto"`` on a GPU, or
            ``max_memory={"cpu": "2GiB"}`` to offload the rest to `offload_folder` on disk.
        show_progress (`bool`, *optional*, defaults to `True`): Progress bars.

    Returns:
        [`CompressionReport`] of the compressed modules, or `None` on processes other than the main one of a
        distributed run (they only help estimate the Fisher; the main process writes the checkpoint).

    Raises:
        `ValueError`: For a missing or non-safetensors checkpoint, an already-compressed checkpoint, key names that
            do not match the model's modules, bad importances, or the usual config errors.
    """
    from transformers import AutoConfig

    from .serialization import _move_into

    model_dir, save_directory = os.fspath(model_dir), os.fspath(save_directory)
    model_config = AutoConfig.from_pretrained(model_dir)
    if config.method is None:  # chosen per model, as `compress` does (see `hf_fwsvd.defaults`)
        config = resolve_defaults(_model_class(model_config, model_class), config.copy_for_run(), in_memory=False)
    method = get_method(config.method)
    if overrides_refine_model(method):
        raise ValueError(
            f"method={config.method!r} refines the whole compressed model after factorising "
            f"({type(method).__name__}.refine_model), which needs the model in memory: load it and use `compress`."
        )
    existing = getattr(model_config, "quantization_config", None)
    if existing is not None:
        method = (
            existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        )
        raise ValueError(f"{model_dir!r} is already quantized ({method}); compress the dense checkpoint instead.")
    if config.factor_dtype is not None or config.budget_unit != "params":
        raise ValueError(
            "`compress_layerwise` writes float factors and counts budgets in weights: `factor_dtype` and "
            '`budget_unit="bytes"` need `compress` (in memory) for now.'
        )
    model_cls = _model_class(model_config, model_class)
    files = _weight_files(model_dir)
    # Shapes only, on the meta device (accelerate's init_empty_weights would untie tied embeddings). Auto classes
    # build through `from_config`, concrete classes through their constructor.
    with torch.device("meta"):
        skeleton = (
            model_cls.from_config(model_config) if hasattr(model_cls, "from_config") else model_cls(model_config)
        )
    run_config = config.copy_for_run()
    targets = find_target_modules(skeleton, run_config)
    _check_keys(targets, files, model_dir)
    shapes = {name: (int(m.weight.shape[0]), int(m.weight.shape[1])) for name, m in targets.items()}
    shapes = {
        name: shape[::-1] if type(targets[name]).__name__ == "Conv1D" else shape for name, shape in shapes.items()
    }
    ranks = resolve_ranks(shapes, run_config) if run_config.param_budget is None else None

    load_kwargs = {
        key: value
        for key, value in {
            "device_map": device_map,
            "max_memory": max_memory,
            "offload_folder": offload_folder and os.fspath(offload_folder),
            "dtype": dtype,
        }.items()
        if value is not None
    }
    blocks = _blocks(skeleton)
    groups = _group_keys(list(files), blocks)
    stats = _statistics(
        model_dir, model_cls, model_config, run_config, targets, loss_fn, load_kwargs,
        {"files": files, "groups": groups, "blocks": blocks}, show_progress,
    )  # fmt: skip
    if not is_main_process():
        return None
    stats = reweigh_first_token(stats, run_config.first_token_weight)
    dense_modules: list[str] = []
    if ranks is None:
        ranks, dense_modules = budget_ranks(_target_weights(targets, files), shapes, run_config, stats)

    params_before = sum(param.numel() for param in skeleton.parameters())
    report = new_report(run_config, params_before, dense_modules, stats)
    os.makedirs(os.path.dirname(os.path.abspath(save_directory)) or ".", exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(save_directory))}.tmp-",
                               dir=os.path.dirname(os.path.abspath(save_directory)))  # fmt: skip
    try:
        weight_map, total_size = {}, 0
        for number, (group, keys) in enumerate(
            tqdm(groups, desc="Factorising blocks", unit="block", disable=not show_progress), start=1
        ):
            # Open the source files per block: a safetensors file is memory-mapped, and pages read through a mapping
            # that stays open count as resident memory until it is closed.
            handles = {path: safe_open(path, framework="pt") for path in sorted({files[key] for key in keys})}
            tensors = _factorise_group(keys, files, handles, targets, ranks, method, stats, run_config, report)
            handles.clear()
            shard = f"model.fwsvd-{number:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, os.path.join(staging, shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            total_size += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
            logger.debug("Wrote %s (%s, %d tensors)", shard, group or "non-block tensors", len(tensors))
            del tensors
        with open(os.path.join(staging, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as handle:
            json.dump(
                {"metadata": {"total_size": total_size}, "weight_map": weight_map}, handle, indent=2, sort_keys=True
            )
        run_config.ranks = ranks
        run_config.source_classes = {
            name: type(module).__name__
            for name, module in targets.items()
            if name in ranks and type(module).__name__ != "Linear"
        }
        run_config.weights_file = WEIGHTS_INDEX_NAME
        run_config.base_model = run_config.base_model or source_name(model_dir)  # as `compress()` records it
        model_config.quantization_config = run_config
        model_config.save_pretrained(staging)
        _finish_report(report, targets, params_before, run_config)
        _saved_report(report, run_config).save(staging)  # `fwsvd_report.json`, as `save_pretrained` writes it
        for name in sorted(os.listdir(model_dir)):
            source = os.path.join(model_dir, name)
            if os.path.isfile(source) and name not in _NOT_COPIED_NAMES and not name.endswith(_NOT_COPIED_SUFFIXES):
                shutil.copy2(source, os.path.join(staging, name))
        _move_into(staging, save_directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Wrote the FWSVD checkpoint of %d modules to %s", len(report.modules), save_directory)
    return report
