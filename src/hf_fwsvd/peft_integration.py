"""peft support: LoRA on a compressed layer by its usual name (`q_proj`), wrapping the whole `LowRankLinear`.

peft's LoRA handles `nn.Linear` and friends; a `LowRankLinear` is neither, so ``LoraConfig(target_modules=["q_proj"])``
on a compressed model would fail with "Target module LowRankLinear(...) is not supported". peft's custom-module
mechanism (`LoraConfig._register_custom_module`, https://huggingface.co/docs/peft/developer_guides/custom_models)
maps a layer type to a LoRA layer class; hf_fwsvd registers [`LowRankLoraLinear`] for `LowRankLinear` in every
`LoraConfig` built once both packages are imported (also the configs peft reads back from an adapter folder), so
``PeftModel.from_pretrained`` works in a fresh process after ``import hf_fwsvd`` as well.

peft itself is imported lazily: `import hf_fwsvd` does not import it; the registration happens when peft's LoRA
config module is first imported (or at once if it already was).

The adapter computes ``y = up(down(x)) + B(A(dropout(x))) * scaling``. Merging is exact and keeps the layer
low-rank: the LoRA factors are appended to the compressed ones (``down' = [down; A]``, ``up' = [up, B * scaling]``),
so a merged layer has rank ``r + lora_r``; `save_pretrained` updates the rank map from the modules.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from typing import Any

import torch
from torch import nn

from .layers import LowRankLinear

__all__ = ["install_peft_support", "register_lora_layers"]

logger = logging.getLogger(__name__)

_LORA_CONFIG_MODULE = "peft.tuners.lora.config"
_PATCHED = "__hf_fwsvd_patched__"


def _lora_layer_class() -> type:
    """Build `LowRankLoraLinear` (its base classes come from peft, which is only imported now)."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class LowRankLoraLinear(nn.Module, LoraLayer):
        """LoRA around a whole [`LowRankLinear`]: ``up(down(x)) + B(A(dropout(x))) * scaling`` (plain LoRA only)."""

        def __init__(
            self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1, **kwargs
        ) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer, **kwargs)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self._merged_ranks: list[int] = []
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Any:
            try:
                return super().resolve_lora_variant(config=config, **kwargs)
            except ValueError as error:
                raise ValueError(
                    f"{error}: a whole LowRankLinear takes plain LoRA only. Drop the variant option (e.g. "
                    "`use_dora=True`), or target the layer's factors instead (`target_modules=['down', 'up']` or "
                    "'all-linear'), which are nn.Linear and take every LoRA variant."
                ) from error

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            """Append each adapter's factors to the low-rank ones (exact; the rank grows by the adapter's `r`)."""
            base = self.get_base_layer()
            for adapter in check_adapters_to_merge(self, adapter_names):
                if adapter not in self.lora_A.keys():
                    continue
                lora_a = self.lora_A[adapter].weight.to(base.down.weight.dtype)
                lora_b = (self.lora_B[adapter].weight * self.scaling[adapter]).to(base.up.weight.dtype)
                down = torch.cat([base.down.weight.data, lora_a.data], dim=0)
                up = torch.cat([base.up.weight.data, lora_b.data], dim=1)
                bias = None
                if self.lora_bias[adapter]:
                    if base.up.bias is None:
                        raise RuntimeError(f"Cannot merge {adapter!r} with `lora_bias=True`: no bias in {base}.")
                    bias = base.up.bias.data + self.lora_B[adapter].bias.data * self.scaling[adapter]
                if safe_merge and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                _set_factors(base, down, up, bias)
                self._merged_ranks.append(lora_a.shape[0])
                self.merged_adapters.append(adapter)

        def unmerge(self) -> None:
            base = self.get_base_layer()
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                added = self._merged_ranks.pop()
                keep = base.rank - added
                bias = None
                if self.lora_bias[adapter]:
                    bias = base.up.bias.data - self.lora_B[adapter].bias.data * self.scaling[adapter]
                _set_factors(base, base.down.weight.data[:keep].clone(), base.up.weight.data[:, :keep].clone(), bias)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            if kwargs.pop("adapter_names", None) is not None:
                raise ValueError("Mixed-adapter batches (`adapter_names=`) are not supported on LowRankLinear layers.")
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            if self.merged:
                return result
            dtype = result.dtype
            for adapter in self.active_adapters:
                if adapter not in self.lora_A.keys():
                    continue
                lora_a = self.lora_A[adapter]
                x_cast = self._cast_input_dtype(x, lora_a.weight.dtype)
                update = self.lora_B[adapter](lora_a(self.lora_dropout[adapter](x_cast)))
                result = result + update * self.scaling[adapter]
            return result.to(dtype)

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    LowRankLoraLinear.__module__ = __name__
    return LowRankLoraLinear


def _set_factors(base: LowRankLinear, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace the factors of `base` (their shapes change with the rank), keeping `requires_grad`."""
    grad = base.down.weight.requires_grad
    base.down = nn.Linear(base.in_features, down.shape[0], bias=False, device="meta")
    base.down.weight = nn.Parameter(down, requires_grad=grad)
    old_bias = base.up.bias
    base.up = nn.Linear(up.shape[1], base.out_features, bias=old_bias is not None, device="meta")
    base.up.weight = nn.Parameter(up, requires_grad=grad)
    if old_bias is not None:
        base.up.bias = nn.Parameter(bias if bias is not None else old_bias.data, requires_grad=old_bias.requires_grad)


_LAYER_CLASS: type | None = None


def register_lora_layers(config: Any) -> Any:
    """Register [`LowRankLoraLinear`] for `LowRankLinear` on one `LoraConfig` (peft's custom-module API)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = _lora_layer_class()
    config._register_custom_module({LowRankLinear: _LAYER_CLASS})
    return config


def _patch_lora_config(module: Any) -> None:
    """Make every `LoraConfig` created from now on register the `LowRankLinear` layer (idempotent)."""
    lora_config = module.LoraConfig
    original = lora_config.__post_init__
    if getattr(original, _PATCHED, False):
        return

    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        register_lora_layers(self)

    setattr(__post_init__, _PATCHED, True)
    lora_config.__post_init__ = __post_init__
    logger.debug("Registered LowRankLinear with peft's LoRA.")


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: once peft's LoRA config module has been executed, patch it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _LORA_CONFIG_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                self._loader = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _patch_lora_config(module)


def install_peft_support() -> None:
    """Patch peft's `LoraConfig` now if peft is imported, otherwise as soon as it is (idempotent)."""
    module = sys.modules.get(_LORA_CONFIG_MODULE)
    if module is not None:
        _patch_lora_config(module)
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
