"""`LowRankLinear`: the module that replaces a dense `nn.Linear` (or GPT-2 `Conv1D`) after compression."""

from __future__ import annotations

import torch
from torch import nn

from .factorize import LowRankFactors, factorize, representable_factors

__all__ = ["LowRankLinear", "dense_weight", "factor_matrix", "is_supported_linear"]


def is_supported_linear(module: nn.Module) -> bool:
    """Whether `module` is a dense linear layer we can factorise (`nn.Linear` or transformers' `Conv1D`)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a supported linear layer in `nn.Linear` layout (``out x in``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.T  # Conv1D stores ``in x out`` and computes ``x @ W + b``
    raise TypeError(f"{type(module).__name__} is not a supported linear layer (nn.Linear or Conv1D).")


def factor_matrix(linear: nn.Linear) -> torch.Tensor:
    """The weight of one factor as a plain tensor (an int8 factor, see `factor_storage`, is dequantised)."""
    weight = linear.weight
    return weight.dequantize() if hasattr(weight, "dequantize") and hasattr(weight, "qdata") else weight


def _meta_linear(
    in_features: int, out_features: int, bias: bool, device: torch.device | str, dtype: torch.dtype | None
) -> nn.Linear:
    """An `nn.Linear` on the `meta` device, built without `reset_parameters` (meta tensors hold no values to
    initialise; skipping it made rebuilding the low-rank modules of a checkpoint about twice as fast)."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    if bias:
        linear.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
    else:
        linear.register_parameter("bias", None)
    return linear


class LowRankLinear(nn.Module):
    """A rank-`r` linear map ``x -> up(down(x))``: ``r * (in + out)`` weights instead of ``in * out``.

    Args:
        in_features (`int`): Size of each input sample.
        out_features (`int`): Size of each output sample.
        rank (`int`): Inner dimension of the factorisation.
        bias (`bool`, *optional*, defaults to `True`): Whether `up` carries the original layer's bias.
        device (`torch.device`, *optional*): Where to allocate the factors (`"meta"` to build a skeleton).
        dtype (`torch.dtype`, *optional*): dtype of the factors.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        linear = _meta_linear if device is not None and torch.device(device).type == "meta" else nn.Linear
        self.down = linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense product ``up.weight @ down.weight`` (``out x in``), computed on access, never stored.

        Some model code reads `.weight` of its linear children (for a dtype or device, or in `_init_weights`); this
        keeps that working without a dense parameter in the module or the state dict. It is a fresh tensor: writing
        to it does not change the module.
        """
        return factor_matrix(self.up) @ factor_matrix(self.down)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )

    @classmethod
    def from_factors(
        cls,
        factors: LowRankFactors,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "weight",
    ) -> LowRankLinear:
        """Build the module from computed factors, cast to `dtype` on `device` (float16/bfloat16 factors are
        rebalanced to fit, see [`representable_factors`]; `name` names the module if they cannot)."""
        factors = representable_factors(factors, dtype, name)
        rank, in_features = factors.down.shape
        module = cls(in_features, factors.up.shape[0], rank, bias=bias is not None, device="meta", dtype=dtype)
        module.down.weight = nn.Parameter(factors.down.to(device=device, dtype=dtype), requires_grad=True)
        module.up.weight = nn.Parameter(factors.up.to(device=device, dtype=dtype), requires_grad=True)
        if bias is not None:
            module.up.bias = nn.Parameter(bias.detach().clone().to(device=device, dtype=dtype), requires_grad=True)
        return module

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: int,
        importance: torch.Tensor | None = None,
        name: str = "weight",
        floor: float | None = None,
        svd_solver: str = "full",
    ) -> LowRankLinear:
        """Factorise a dense layer (`nn.Linear` or `Conv1D`) with FWSVD (or plain SVD when `importance` is `None`).

        Args:
            linear (`nn.Module`): The dense layer.
            rank (`int`): Kept rank.
            importance (`torch.Tensor`, *optional*): Per-input-feature Fisher importance.
            name (`str`, *optional*): Module name for error messages.
            floor (`float`, *optional*): Relative importance floor passed to [`factorize`].
            svd_solver (`str`, *optional*, defaults to `"full"`): `"full"`, `"randomized"` or `"auto"` (see
                [`factorize`]).
        """
        weight = dense_weight(linear)
        kwargs = {} if floor is None else {"floor": floor}
        factors = factorize(weight, rank, importance, name=name, svd_solver=svd_solver, **kwargs)
        return cls.from_factors(factors, linear.bias, dtype=weight.dtype, device=weight.device, name=name)

    def to_linear(self) -> nn.Linear:
        """The equivalent dense `nn.Linear` (same dtype and device)."""
        up, down = factor_matrix(self.up).detach(), factor_matrix(self.down).detach()
        weight = up.to(torch.float32) @ down.to(torch.float32)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.up.bias is not None, device="meta", dtype=weight.dtype
        )
        linear.weight = nn.Parameter(weight.to(up.dtype), requires_grad=self.up.weight.requires_grad)
        if self.up.bias is not None:
            linear.bias = nn.Parameter(self.up.bias.detach().clone(), requires_grad=self.up.bias.requires_grad)
        return linear
