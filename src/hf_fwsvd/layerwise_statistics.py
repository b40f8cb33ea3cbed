"""Calibration statistics of a checkpoint on disk, one transformer block in memory at a time.

A `meta` skeleton of the model gets its non-block weights (embeddings, final norm, head) from the safetensors files;
[`~hf_fwsvd.statistics.blockwise.collect_blockwise`] then loads each block's weights when it runs it and puts the
block back on `meta` afterwards. Non-persistent buffers (rotary frequencies, position ids), which no checkpoint holds,
are created and initialised by the model's own `_init_weights`, as `from_pretrained` does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .methods import collect_statistics
from .statistics import Statistics
from .statistics.blockwise import collect_blockwise
from .targets import find_target_modules

__all__ = ["blockwise_statistics"]

logger = logging.getLogger(__name__)


class _CheckpointBlocks:
    """Loads the tensors of one key group (`""` for the non-block ones, else a block) into a meta skeleton."""

    def __init__(
        self, model: nn.Module, files: dict[str, str], groups: dict[str, list[str]], dtype: torch.dtype | None
    ) -> None:
        self.model, self.files, self.groups, self.dtype = model, files, groups, dtype

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        handles = {path: safe_open(path, framework="pt") for path in sorted({self.files[key] for key in keys})}
        try:
            tensors = {}
            for key in keys:
                tensor = handles[self.files[key]].get_tensor(key)
                if self.dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(self.dtype)
                tensors[key] = tensor
            return tensors
        finally:
            handles.clear()

    def _buffers(self, module: nn.Module, skip: tuple[str, ...]) -> None:
        """Create the non-persistent buffers of `module` (outside `skip`) and let the model initialise them."""
        owners = {}
        for name, owner in module.named_modules():
            if any(name == prefix or name.startswith(prefix + ".") for prefix in skip):
                continue
            for buffer_name in list(owner._non_persistent_buffers_set):
                buffer = owner._buffers.get(buffer_name)
                if buffer is not None and buffer.is_meta:
                    owner._buffers[buffer_name] = torch.empty_like(buffer, device="cpu")
                    owners[id(owner)] = owner
        init = getattr(self.model, "_init_weights", None)
        if init is not None:
            with torch.no_grad():
                for owner in owners.values():
                    init(owner)

    def load(self, group: str, module: nn.Module | None = None) -> None:
        """Materialise the tensors of `group` in place (the non-block ones for ``""``) into `module` (by default the
        model's module of that name).

        Raises:
            `ValueError`: When some weight of the group is not in the checkpoint.
        """
        module = module if module is not None else self.model.get_submodule(group) if group else self.model
        blocks = tuple(name for name in self.groups if name) if not group else ()
        skip = tuple(block for block in blocks)
        self._buffers(module, skip)
        prefix = f"{group}." if group else ""
        state = {key[len(prefix) :]: tensor for key, tensor in self._read(self.groups[group]).items()}
        module.load_state_dict(state, strict=False, assign=True)
        if not group and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]:
            if tensor.is_meta and not any(name == b or name.startswith(b + ".") for b in skip):
                raise ValueError(
                    f"The checkpoint has no `{prefix}{name}`, which the model needs to run; it cannot be used for "
                    "block-by-block calibration."
                )

    def free(self, group: str, module: nn.Module) -> None:
        """Put the block `group` (`module`) back on the `meta` device."""
        module.to("meta")


def blockwise_statistics(
    model_cls: type,
    model_config: Any,
    config: Any,
    files: dict[str, str],
    groups: list[tuple[str, list[str]]],
    blocks: list[str],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    dtype: torch.dtype | None,
    show_progress: bool,
) -> Statistics:
    """The statistics `config` needs (see `hf_fwsvd.methods.collect_statistics`), collected block by block.

    Args:
        model_cls (`type`): The model class to build on the `meta` device.
        model_config (`PretrainedConfig`): Its config.
        config ([`FWSVDConfig`]): The run's config.
        files (`dict[str, str]`): Checkpoint key -> safetensors file.
        groups (`list[tuple[str, list[str]]]`): ``("", non-block keys)`` then one ``(block, keys)`` per block.
        blocks (`list[str]`): The block names, in order.
        loss_fn (`Callable`, *optional*): Calibration loss.
        dtype (`torch.dtype`, *optional*): Cast the floating-point weights to this dtype.
        show_progress (`bool`): Progress bars.

    Raises:
        [`~hf_fwsvd.statistics.blockwise.BlockwiseUnsupported`]: When the model is not a plain stack of blocks.
    """
    with torch.device("meta"):
        model = model_cls.from_config(model_config) if hasattr(model_cls, "from_config") else model_cls(model_config)
    table = {group: keys for group, keys in groups}
    table.setdefault("", [])
    source = _CheckpointBlocks(model, files, table, dtype)
    source.load("")
    targets = find_target_modules(model, config)
    collector = functools.partial(collect_blockwise_for, blocks=blocks, load=source.load, free=source.free)
    try:
        return collect_statistics(model, config, targets, loss_fn, show_progress, collector=collector)
    finally:
        model.to("meta")


def collect_blockwise_for(
    model: nn.Module,
    batches: Any,
    modules: dict[str, nn.Module],
    statistics: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    show_progress: bool,
    fisher_estimator: str = "empirical",
    *,
    blocks: list[str],
    load: Callable[[str, nn.Module], None],
    free: Callable[[str, nn.Module], None],
) -> Statistics:
    """`collect_blockwise` with the argument order of `hf_fwsvd.statistics.collect` (the `collector` hook)."""
    return collect_blockwise(
        model, blocks, load, free, batches, modules, statistics, loss_fn, show_progress, fisher_estimator
    )
