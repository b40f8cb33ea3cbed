"""Deploy a compressed model on CPU with dynamic int8: smooth each low-rank layer's inner activation, then quantise.

The recipe of issue #15 (`benchmarks/README.md`, "Low rank + int8"): the `up` factor of a [`LowRankLinear`] reads
the rank-``r`` coordinates ``h = D x``, whose per-feature ranges differ widely, so one per-tensor int8 scale spends
its range on a few of them. SmoothQuant's per-feature factor

    ``s_j = max|h_j|^alpha / max_i |U_ij|^(1 - alpha)``

(``max|h_j|`` from calibration data) rebalances the two factors: ``D`` row ``j`` is divided by ``s_j`` and ``U``
column ``j`` multiplied by it. ``U diag(s) diag(1/s) D = U D``, so the fp32 model is unchanged (up to rounding) and no
extra operation runs at inference; only the int8 rounding moves. Then every `nn.Linear` goes through PyTorch's
`quantize_dynamic` (int8 weights, one scale per tensor, activations quantised per batch), with 8-bit instead of
PyTorch's 7-bit activations where the CPU has int8 dot-product instructions (AVX512-VNNI or AMX).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import build_calibration_loader
from .layers import LowRankLinear
from .statistics import input_device

__all__ = [
    "FullRangeDynamicLinear",
    "collect_input_absmax",
    "cpu_has_int8_dot_product",
    "fold_smoothing",
    "quantize_int8",
    "smoothing_scales",
]

logger = logging.getLogger(__name__)

INT8_FLAGS = ("avx512_vnni", "amx_int8")


class FullRangeDynamicLinear(torch.ao.nn.quantized.dynamic.Linear):
    """`quantize_dynamic`'s linear with 8-bit instead of 7-bit activations.

    PyTorch's dynamic linear always asks fbgemm for ``reduce_range=True``, which avoids int16 overflow in the
    AVX2 kernels; with AVX512-VNNI or AMX the products accumulate in int32, the full range is safe and the activation
    rounding step halves. [`quantize_int8`] makes it by swapping the class of a quantised module.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params._packed_params
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)


def cpu_has_int8_dot_product() -> bool:
    """Whether this CPU has AVX512-VNNI or AMX int8, so 8-bit dynamic activations cannot overflow in fbgemm.

    Asks torch's CPU capability table first, then `/proc/cpuinfo`'s flags (``avx512_vnni``, ``amx_int8``). AVX-VNNI
    (the 256-bit form) is not counted: fbgemm's dynamic linear has no kernel for it.
    """
    capabilities = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if "AMX" in capabilities or "VNNI" in capabilities:
        return True
    for check in ("_is_vnni_supported", "_is_amx_tile_supported"):
        if getattr(torch.cpu, check, lambda: False)():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in INT8_FLAGS)


def _activation_bits(activation_bits: int | str) -> int:
    """`activation_bits` checked and, for ``"auto"``, resolved to 8 (VNNI / AMX CPU) or 7."""
    if activation_bits == "auto":
        bits = 8 if cpu_has_int8_dot_product() else 7
        logger.info(
            "activation_bits='auto': %d-bit activations (%s).",
            bits,
            "the CPU has AVX512-VNNI or AMX" if bits == 8 else "the CPU has neither AVX512-VNNI nor AMX",
        )
        return bits
    if activation_bits not in (7, 8) or isinstance(activation_bits, bool):
        raise ValueError(f"`activation_bits` must be 'auto', 7 or 8, got {activation_bits!r}.")
    if activation_bits == 8 and not cpu_has_int8_dot_product():
        raise ValueError(
            "`activation_bits=8` needs a CPU with AVX512-VNNI or AMX (without them fbgemm's 8-bit activations can "
            "overflow and give wrong outputs); this CPU has neither: use `activation_bits=7` or 'auto'."
        )
    return activation_bits


def _check_alpha(alpha: Any, argument: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(
            f"`{argument}` must be in (0, 1], got {alpha!r}; 0.5 is SmoothQuant's default"
            + (", None skips smoothing." if argument == "smooth_alpha" else ".")
        )


def smoothing_scales(weight: torch.Tensor, absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-feature factor ``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)``.

    Both maxima are clamped below at 1e-8 and the result to ``[1e-5, 1e5]``. Dividing the input by ``s`` and
    multiplying the weight columns by it moves the fraction ``alpha`` of the outlier range into the weights.

    Args:
        weight (`torch.Tensor`): The layer's ``out x in`` weight.
        absmax (`torch.Tensor`): ``max |x_j|`` per input feature, length ``in``.
        alpha (`float`): Migration strength in (0, 1].
    """
    weight_max = weight.detach().abs().amax(0).float().clamp(min=1e-8)
    return (absmax.float().clamp(min=1e-8).pow(alpha) / weight_max.pow(1 - alpha)).clamp(1e-5, 1e5)


@torch.no_grad()
def collect_input_absmax(
    model: nn.Module,
    calibration_dataset: Any,
    tokenizer: Any = None,
    modules: list[str] | None = None,
    num_samples: int | None = 128,
    batch_size: int = 16,
    max_length: int = 128,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``max |x_j|`` per input feature of each `nn.Linear` of `model` over the calibration data (fp32, CPU).

    Padding tokens count: dynamic quantisation sees them too, in the same per-tensor range.

    Args:
        model (`nn.Module`): The model, run in eval mode (its mode is restored).
        calibration_dataset: Anything `FWSVDConfig.calibration_dataset` accepts (list of strings or dicts,
            `datasets.Dataset`, `DataLoader`).
        tokenizer (*optional*): Tokenizer for text data.
        modules (`list[str]`, *optional*): Names of the linears to watch (default: every `nn.Linear`).
        num_samples (`int`, *optional*, defaults to 128): Calibration examples read (`None`: all).
        batch_size (`int`, *optional*, defaults to 16): Batch size.
        max_length (`int`, *optional*, defaults to 128): Token truncation length.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm progress bar over batches.

    Raises:
        `ValueError`: For missing or empty data (see `build_calibration_loader`), a name that is not an `nn.Linear`
            of `model`, or a module no batch reached.
    """
    if calibration_dataset is None:
        raise ValueError(
            "Smoothing needs calibration data: pass `calibration_dataset=` (and `tokenizer=` for text), or "
            "`smooth_alpha=None` to skip smoothing."
        )
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    names = list(linears) if modules is None else modules
    for name in names:
        if name not in linears:
            raise ValueError(f"`modules`: {name!r} is not an nn.Linear of the model.")
    # forward passes only: the loader gets the model's config (padding id, positions) but no task, so needs no labels
    config_only = SimpleNamespace(config=getattr(model, "config", None))
    loader = build_calibration_loader(calibration_dataset, tokenizer, config_only, num_samples, batch_size, max_length)
    absmax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple) -> None:
            value = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float().cpu()
            absmax[name] = torch.maximum(absmax[name], value) if name in absmax else value

        return record

    handles = [linears[name].register_forward_pre_hook(hook(name)) for name in names]
    was_training = model.training
    model.eval()
    device = input_device(model)
    try:
        for batch in tqdm(loader, desc="int8 calibration", disable=not show_progress):
            if isinstance(batch, dict):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
                model(**batch)
            else:
                model(batch.to(device) if torch.is_tensor(batch) else batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unseen = [name for name in names if name not in absmax]
    if unseen:
        raise ValueError(f"No calibration batch reached {unseen[0]!r}; check that the data fits the model.")
    return absmax


def _low_rank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}
    if not layers:
        raise ValueError(
            "The model has no LowRankLinear layer to smooth: compress it first (`hf_fwsvd.compress`) or pass "
            "`smooth_alpha=None` to quantise without smoothing."
        )
    return layers


@torch.no_grad()
def fold_smoothing(
    model: nn.Module,
    calibration_dataset: Any = None,
    tokenizer: Any = None,
    alpha: float = 0.5,
    input_absmax: dict[str, torch.Tensor] | None = None,
    num_samples: int | None = 128,
    batch_size: int = 16,
    max_length: int = 128,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Smooth the input of every [`LowRankLinear`]'s `up` factor, folded into the factors (in place).

    For each layer, ``s = smoothing_scales(up.weight, max|down(x)|, alpha)``; `down`'s row ``j`` is divided by
    ``s_j`` and `up`'s column ``j`` multiplied by it, so the layer computes the same map in exact arithmetic and the
    model still saves and reloads as a normal FWSVD checkpoint (`save_pretrained` / `from_pretrained`).

    Args:
        model (`nn.Module`): A compressed model (changed in place).
        calibration_dataset (*optional*): Data for the ranges, in any form `FWSVDConfig.calibration_dataset` takes.
        tokenizer (*optional*): Tokenizer for text data.
        alpha (`float`, *optional*, defaults to 0.5): Migration strength in (0, 1].
        input_absmax (`dict[str, torch.Tensor]`, *optional*): Precomputed ranges keyed by the `up` factors' names
            (``"<layer>.up"``, as `collect_input_absmax` returns them); replaces `calibration_dataset`.
        num_samples (`int`, *optional*, defaults to 128): Calibration examples read.
        batch_size (`int`, *optional*, defaults to 16): Calibration batch size.
        max_length (`int`, *optional*, defaults to 128): Token truncation length.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm progress bar over batches.

    Returns:
        `dict[str, torch.Tensor]`: The scales ``s`` applied, keyed by layer name.

    Raises:
        `ValueError`: For `alpha` outside (0, 1], a model without `LowRankLinear`, no calibration data or ranges, or
            ranges missing a layer.
    """
    _check_alpha(alpha, "alpha")
    layers = _low_rank_layers(model)
    ups = [f"{name}.up" for name in layers]
    if input_absmax is None:
        input_absmax = collect_input_absmax(
            model, calibration_dataset, tokenizer, ups, num_samples, batch_size, max_length, show_progress
        )
    missing = [name for name in ups if name not in input_absmax]
    if missing:
        raise ValueError(f"`input_absmax` has no range for {missing[0]!r}; collect it with `collect_input_absmax`.")
    scales = {}
    for name, layer in layers.items():
        scale = smoothing_scales(layer.up.weight, input_absmax[f"{name}.up"], alpha).to(layer.up.weight.device)
        layer.down.weight.div_(scale.to(layer.down.weight.dtype)[:, None])
        layer.up.weight.mul_(scale.to(layer.up.weight.dtype))
        scales[name] = scale
    logger.info("Folded SmoothQuant scales (alpha %g) into %d low-rank layers.", alpha, len(layers))
    return scales


def quantize_int8(
    model: nn.Module,
    calibration_dataset: Any = None,
    tokenizer: Any = None,
    smooth_alpha: float | None = 0.5,
    activation_bits: int | str = "auto",
    input_absmax: dict[str, torch.Tensor] | None = None,
    num_samples: int | None = 128,
    batch_size: int = 16,
    max_length: int = 128,
    show_progress: bool = True,
) -> nn.Module:
    """A CPU int8 copy of a compressed model: [`fold_smoothing`] (unless `smooth_alpha=None`), then dynamic int8
    (`torch.ao.quantization.quantize_dynamic`, qint8 weights with one scale per tensor) of every `nn.Linear`.

    Args:
        model (`nn.Module`): The compressed (optionally fine-tuned) fp32 model; not changed.
        calibration_dataset (*optional*): Data for the smoothing ranges, in any form
            `FWSVDConfig.calibration_dataset` takes; never the data you evaluate on.
        tokenizer (*optional*): Tokenizer for text data.
        smooth_alpha (`float`, *optional*, defaults to 0.5): SmoothQuant migration strength in (0, 1]; `None` skips
            smoothing (e.g. for a model already passed through `fold_smoothing`, or a dense one).
        activation_bits (`int` or `str`, *optional*, defaults to `"auto"`): 8 (needs AVX512-VNNI or AMX), 7
            (PyTorch's default, `reduce_range=True`, safe everywhere) or ``"auto"`` (8 where safe, logged).
        input_absmax (`dict[str, torch.Tensor]`, *optional*): Precomputed `collect_input_absmax` ranges.
        num_samples (`int`, *optional*, defaults to 128): Calibration examples read.
        batch_size (`int`, *optional*, defaults to 16): Calibration batch size.
        max_length (`int`, *optional*, defaults to 128): Token truncation length.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm progress bar over calibration batches.

    Returns:
        `nn.Module`: The quantised copy, for CPU inference (`torch.save` it whole; `save_pretrained` does not
        store dynamic int8 modules).

    Raises:
        `ValueError`: For bad `smooth_alpha` or `activation_bits`, 8-bit activations on a CPU without VNNI / AMX,
            smoothing without `LowRankLinear` layers or without calibration data.
    """
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    bits = _activation_bits(activation_bits)
    if smooth_alpha is not None:
        _check_alpha(smooth_alpha, "smooth_alpha")
        _low_rank_layers(model)
        if calibration_dataset is None and input_absmax is None:
            raise ValueError(
                "Smoothing needs calibration data: pass `calibration_dataset=` (and `tokenizer=` for text), or "
                "`smooth_alpha=None` to skip smoothing."
            )
    model = copy.deepcopy(model)
    if smooth_alpha is not None:
        fold_smoothing(
            model,
            calibration_dataset,
            tokenizer,
            smooth_alpha,
            input_absmax,
            num_samples,
            batch_size,
            max_length,
            show_progress,
        )
    model.eval()
    model = quantize_dynamic(model, {nn.Linear: default_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    quantised = [m for m in model.modules() if type(m) is torch.ao.nn.quantized.dynamic.Linear]
    if bits == 8:
        for module in quantised:
            module.__class__ = FullRangeDynamicLinear
    logger.info("Quantised %d linear layers to dynamic int8 (%d-bit activations).", len(quantised), bits)
    return model
