"""8-bit storage of the low-rank factors (`FWSVDConfig(factor_dtype="int8")`), through torchao.

Dobi-SVD's "remapping" observation: at equal bytes a higher rank fits when the factors are stored in 8 bits. After
factorisation (and any refinement), the singular values are split as ``sqrt(S)`` between the two factors, so both
have rows on the same scale (see [`balanced_factors`]), then `down` and `up` of every [`LowRankLinear`] become
torchao's per-channel weight-only int8 (``quantize_(linear, Int8WeightOnlyConfig())``: one scale per output row of
each factor, symmetric, no zero offset). The maths of the quantisation is torchao's; this file only moves its tensors.

Checkpoint layout: a quantised factor ``<module>.down`` is written as three plain tensors,
``<module>.down.weight_qdata`` (int8, ``rank x in``), ``<module>.down.weight_scale`` (``rank x 1``, the model dtype)
and ``<module>.down.weight_zero_point`` (int8, ``rank x 1``); likewise ``up``. On reload the skeleton holds
[`Int8FactorSlot`] placeholders with exactly those parameters, transformers loads them as they are, and
[`finish_int8_factors`] wraps them back into torchao tensors: no dense weight is ever built and nothing is quantised
again, so the reloaded int8 data and scales are bit-identical to the saved ones.

torchao is imported lazily: users who never ask for int8 factors do not need it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from .factorize import LowRankFactors

__all__ = [
    "FACTOR_DTYPES",
    "INT8_STORAGE",
    "Int8FactorSlot",
    "balanced_factors",
    "build_int8_slots",
    "factor_element_bytes",
    "finish_int8_factors",
    "flatten_int8_state_dict",
    "quantize_factors",
    "require_torchao",
    "storage_bytes",
]

FACTOR_DTYPES = ("int8",)
INT8_STORAGE = "int8 per-channel weight-only (torchao Int8WeightOnlyConfig)"
_PARTS = ("qdata", "scale", "zero_point")


def require_torchao(what: str = 'factor_dtype="int8"') -> None:
    """Raise `ImportError` naming the install command when torchao is missing."""
    if importlib.util.find_spec("torchao") is None:
        raise ImportError(
            f"`{what}` stores the low-rank factors through torchao, which is not installed: "
            "`pip install torchao` (or `pip install hf-fwsvd[int8]`)."
        )


def factor_element_bytes(factor_dtype: str | None, dense_dtype: torch.dtype) -> int:
    """Bytes of one factor element: 1 for int8 factors, else the model dtype's size."""
    if factor_dtype == "int8":
        return 1
    return torch.empty((), dtype=dense_dtype).element_size()


def balanced_factors(factors: LowRankFactors) -> LowRankFactors:
    """The same product with each component's scale split evenly: ``down_k / sqrt(c_k)``, ``up_k * sqrt(c_k)`` with
    ``c_k = ||down_k|| / ||up_k||``, so ``||down_k|| = ||up_k||``.

    For `factorize`'s output (orthonormal `up`, `down = S V^T`) this is the ``sqrt(S)`` split: both factors carry
    ``sqrt(s_k)``. Per-channel int8 then spends its 256 levels on rows of comparable range in both factors.
    """
    with torch.no_grad():
        down, up = factors.down.to(torch.float32), factors.up.to(torch.float32)
        scale = (down.norm(dim=1) / up.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
        return LowRankFactors(down=down / scale[:, None], up=up * scale[None, :])


def _int8_config() -> Any:
    require_torchao()
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def quantize_factors(model: nn.Module, names: list[str]) -> None:
    """Balance, then quantise `down` and `up` of the named [`LowRankLinear`] modules to torchao per-channel int8."""
    from torchao.quantization import quantize_

    from .layers import LowRankLinear

    config = _int8_config()
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LowRankLinear):
            raise TypeError(f"`{name}` is a {type(module).__name__}, not a LowRankLinear; cannot store it in int8.")
        dtype, device = module.down.weight.dtype, module.down.weight.device
        balanced = balanced_factors(LowRankFactors(down=module.down.weight.detach(), up=module.up.weight.detach()))
        for part, value in (("down", balanced.down), ("up", balanced.up)):
            linear = getattr(module, part)
            linear.weight = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
            if linear.in_features == 1:
                linear.weight = nn.Parameter(_single_column_int8(linear.weight.detach()), requires_grad=False)
            else:
                quantize_(linear, config)


def _single_column_int8(weight: torch.Tensor) -> Any:
    """torchao 0.18's per-row int8 fails on a one-column weight (the `up` of a rank-1 module): quantise it with a
    zero column appended (which changes no row maximum, hence no scale) and keep the first column."""
    from torchao.quantization import Int8Tensor, PerRow

    padded = Int8Tensor.from_hp(torch.cat([weight, torch.zeros_like(weight)], dim=1), granularity=PerRow())
    return Int8Tensor(
        padded.qdata[:, :1].contiguous(),
        padded.scale,
        block_size=[1, 1],
        dtype=weight.dtype,
        zero_point=padded.zero_point,
    )


def is_int8_tensor(tensor: Any) -> bool:
    return all(hasattr(tensor, part) for part in _PARTS) and hasattr(tensor, "dequantize")


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` occupies: its int8 data, scales and zero points for a torchao int8 tensor."""
    if is_int8_tensor(tensor):
        return sum(getattr(tensor, part).numel() * getattr(tensor, part).element_size() for part in _PARTS)
    return tensor.numel() * tensor.element_size()


def flatten_int8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every torchao int8 weight replaced by its plain ``weight_qdata`` / ``weight_scale``
    / ``weight_zero_point`` tensors (safetensors stores plain tensors only)."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if is_int8_tensor(value):
            for part in _PARTS:
                state[f"{key}_{part}"] = getattr(value, part).detach()
        else:
            state[key] = value
    return state


class Int8FactorSlot(nn.Module):
    """Placeholder for one int8 factor while a checkpoint loads: it holds the saved tensors under their checkpoint
    names and is replaced by an `nn.Linear` with a torchao weight once they are in (see [`finish_int8_factors`]).

    Args:
        in_features (`int`): Input size of the factor.
        out_features (`int`): Output size (one scale per output row).
        bias (`bool`): Whether the factor carries the layer's bias (`up` only).
        scale_dtype (`torch.dtype`): dtype of the scales (the model dtype).
        device (`torch.device`, *optional*): Where to allocate (`meta` while transformers builds the model).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scale_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, 1)
        self.weight_qdata = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(shape, dtype=scale_dtype, device=device), requires_grad=False)
        self.weight_zero_point = nn.Parameter(torch.empty(shape, dtype=torch.int8, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=scale_dtype, device=device)) if bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("An int8 factor placeholder was called before the checkpoint's factors were loaded.")

    def to_linear(self, name: str) -> nn.Linear:
        """The loaded factor as an `nn.Linear` whose weight is a torchao `Int8Tensor` built from the loaded tensors."""
        from torchao.quantization import Int8Tensor

        scale = self.weight_scale.detach()
        if not torch.isfinite(scale).all():
            raise ValueError(
                f"The checkpoint's `{name}.weight_scale` holds NaN/Inf values: the weights file is corrupt or was "
                "saved from a broken model. Re-save it with `save_pretrained` from the compressed model."
            )
        weight = Int8Tensor(
            self.weight_qdata.detach(),
            scale,
            block_size=[1, self.in_features],
            dtype=scale.dtype,
            zero_point=self.weight_zero_point.detach(),
        )
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear


def build_int8_slots(model: nn.Module, names: list[str]) -> None:
    """Give each named `LowRankLinear` of a freshly built skeleton [`Int8FactorSlot`] factors, so transformers loads
    the int8 tensors of the checkpoint straight into them."""
    require_torchao('loading a checkpoint with factor_dtype="int8"')
    for name in names:
        module = model.get_submodule(name)
        weight = module.down.weight
        for part in ("down", "up"):
            linear = getattr(module, part)
            slot = Int8FactorSlot(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                scale_dtype=weight.dtype,
                device=weight.device,
            )
            setattr(module, part, slot)


def finish_int8_factors(model: nn.Module) -> int:
    """Replace every loaded [`Int8FactorSlot`] by an `nn.Linear` holding a torchao int8 weight; returns how many."""
    slots = [(name, module) for name, module in model.named_modules() if isinstance(module, Int8FactorSlot)]
    for name, slot in slots:
        model.set_submodule(name, slot.to_linear(name))
    return len(slots)
