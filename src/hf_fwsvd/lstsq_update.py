"""SVD-LLM's parameter update: refit the `up` factor by least squares after truncation, block by block.

After a module's weight ``W`` (``out x in``) is replaced by ``A B`` (``up @ down``), SVD-LLM (Wang et al. 2024,
Sec. 3.2, and `whitening_local_update` in their public code) keeps the truncated ``B`` and refits ``A`` so that the
module reproduces the dense outputs on calibration inputs:

    ``A* = argmin_A ||W X^T - A B X^T||_F^2 = W C B^T (B C B^T)^{-1}``,  with ``C = X^T X``.

The inputs ``X`` are those of the **compressed** model: blocks are processed in model order, the hidden states
entering block ``i`` come from the already compressed and updated blocks ``0 .. i-1``, and inside block ``i`` the
targets are the outputs of the dense modules run on them (the dense block runs once to collect ``C`` for each of its
modules, the updated low-rank block then runs to produce the next block's inputs). This is what corrects the error
that earlier blocks pass on.

Two facts make the update safe and explain its effect (both tested):

- For a fixed ``B``, ``A*`` minimises the output error on ``X``, so the update never raises it (a solve that would,
  through rounding or the tiny ridge, is rejected and the module keeps its factors).
- With ``C`` equal to the statistics the whitened truncation used (``method="whiten"``, first block), the update is
  a no-op: ``B = U_r^T W`` gives ``W C B^T = U_r S_r^2`` and ``B C B^T = S_r^2``, so ``A* = U_r``. The gain comes only
  from the shift of the inputs that the compressed earlier blocks cause.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import LowRankLinear, dense_weight

__all__ = ["UpdateReport", "output_error", "sequential_update", "update_up_factor"]

logger = logging.getLogger(__name__)

# Relative ridge added to ``B C B^T`` (scaled by its largest diagonal entry) so that a rank-deficient ``C`` solves.
RIDGE = 1e-8


@dataclass
class UpdateReport:
    """Per-module output error on the compressed model's calibration inputs, before and after the update.

    Args:
        errors (`dict[str, tuple[float, float]]`): Module name -> ``(before, after)`` relative output error
            ``sqrt(tr(dW C dW^T) / tr(W C W^T))``.
        rejected (`list[str]`): Modules whose solve did not lower the error (their factors were kept).
    """

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)


def output_error(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, second_moment: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr((W - A B) C (W - A B)^T) / tr(W C W^T))`` (float64)."""
    dense = weight.detach().to(torch.float64)
    moment = second_moment.detach().to(torch.float64)
    residual = dense - up.detach().to(torch.float64) @ down.detach().to(torch.float64)
    numerator = ((residual @ moment) * residual).sum().clamp_min(0)
    denominator = ((dense @ moment) * dense).sum().clamp_min(1e-300)
    return float((numerator / denominator).sqrt())


def update_up_factor(weight: torch.Tensor, down: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """The least-squares `up` factor ``W C B^T (B C B^T)^{-1}`` for a fixed `down` ``B`` (float64 solve).

    Args:
        weight (`torch.Tensor`): The dense weight ``W`` (``out x in``).
        down (`torch.Tensor`): The kept `down` factor ``B`` (``rank x in``).
        second_moment (`torch.Tensor`): ``C = X^T X`` (any positive scale) of the inputs to fit (``in x in``).

    Returns:
        `torch.Tensor`: float32 ``out x rank``.
    """
    dense = weight.detach().to(torch.float64)
    basis = down.detach().to(torch.float64)
    moment = second_moment.detach().to(torch.float64)
    projected = basis @ moment  # B C  (rank x in)
    gram = projected @ basis.T  # B C B^T  (rank x rank)
    gram = (gram + gram.T) / 2
    scale = gram.diagonal().abs().max().clamp_min(1e-300)
    identity = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    rhs = dense @ projected.T  # W C B^T  (out x rank)
    solution = torch.linalg.solve(gram + RIDGE * scale * identity, rhs.T).T
    return solution.to(torch.float32)


def _blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks (entries of the outermost `nn.ModuleList`s), in model order."""
    blocks: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(block + ".") for block in blocks):
            blocks.extend(f"{name}.{index}" if name else str(index) for index in range(len(module)))
    return blocks


def _as_module(low_rank: LowRankLinear, dense: nn.Module | torch.Tensor) -> nn.Module:
    if isinstance(dense, nn.Module):
        return dense
    weight = dense.detach()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=low_rank.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if low_rank.bias is not None:
        linear.bias = nn.Parameter(low_rank.bias.detach(), requires_grad=False)
    return linear


class _Stop(Exception):
    """Raised by the capture hook once the first block's inputs are stored."""


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Iterable[Any]
) -> list[tuple[tuple, dict, torch.Tensor | None]]:
    captured: list[tuple[tuple, dict, torch.Tensor | None]] = []
    mask: list[torch.Tensor | None] = [None]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((tuple(args), dict(kwargs), mask[0]))
        raise _Stop

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
            mask[0] = batch.get("attention_mask")
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def sequential_update(
    model: nn.Module,
    dense_modules: dict[str, nn.Module | torch.Tensor],
    batches: Iterable[dict[str, torch.Tensor]],
) -> UpdateReport:
    """Refit the `up` factor of every compressed module in `dense_modules`, block by block (see the module docstring).

    Args:
        model (`nn.Module`): The compressed model (its targets already `LowRankLinear`); updated in place.
        dense_modules (`dict[str, nn.Module | torch.Tensor]`): Compressed module name -> the dense module it
            replaced, or its dense weight (``out x in``; an `nn.Linear` with the factor's bias is built around it).
            They are swapped in temporarily and never modified.
        batches (`Iterable[dict]`): Calibration batches (dicts with `input_ids`, optionally `attention_mask`).

    Returns:
        [`UpdateReport`]

    Raises:
        `ValueError`: When a name is not a `LowRankLinear` in `model` or is outside every transformer block.
    """
    blocks = _blocks(model)
    by_block: dict[str, list[str]] = {}
    for name in dense_modules:
        if not isinstance(model.get_submodule(name), LowRankLinear):
            raise ValueError(f"`{name}` is not a LowRankLinear in the model; compress it before the update.")
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None:
            raise ValueError(
                f"`{name}` is outside every transformer block (an entry of an nn.ModuleList); the sequential update "
                "runs block by block and cannot place it."
            )
        by_block.setdefault(block, []).append(name)
    dense_modules = {name: _as_module(model.get_submodule(name), dense) for name, dense in dense_modules.items()}
    report = UpdateReport()
    if not by_block:
        return report
    ordered = [b for b in blocks if b in by_block]
    first, last = blocks.index(ordered[0]), blocks.index(ordered[-1])
    was_training = model.training
    model.eval()
    try:
        cached = _capture_block_inputs(model, model.get_submodule(blocks[first]), batches)
        if not cached:
            raise ValueError("The calibration data produced no batches: the update needs at least one.")
        for block_name in blocks[first : last + 1]:
            block = model.get_submodule(block_name)
            names = by_block.get(block_name, [])
            if names:
                moments = _collect_dense_moments(model, block, names, dense_modules, cached)
                for name in names:
                    _update_one(model.get_submodule(name), dense_modules[name], moments[name], name, report)
            cached = [
                ((_block_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs, mask)
                for args, kwargs, mask in cached
            ]
    finally:
        model.train(was_training)
    return report


def _collect_dense_moments(
    model: nn.Module,
    block: nn.Module,
    names: list[str],
    dense_modules: dict[str, nn.Module],
    cached: list[tuple[tuple, dict, torch.Tensor | None]],
) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each dense module's inputs while the dense version of `block` runs on `cached`."""
    low_rank = {name: model.get_submodule(name) for name in names}
    moments: dict[str, torch.Tensor] = {}
    current: list[torch.Tensor | None] = [None]
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            rows = args[0].detach().to(torch.float64)
            mask = current[0]
            if mask is not None and rows.ndim == 3 and tuple(mask.shape) == tuple(rows.shape[:2]):
                rows = rows[mask.bool()]
            rows = rows.reshape(-1, rows.shape[-1])
            moment = rows.T @ rows
            moments[name] = moments[name] + moment if name in moments else moment

        return hook

    try:
        for name in names:
            model.set_submodule(name, dense_modules[name])
            handles.append(dense_modules[name].register_forward_hook(make_hook(name)))
        for args, kwargs, mask in cached:
            current[0] = mask
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for name, module in low_rank.items():
            model.set_submodule(name, module)
    return moments


def _update_one(
    module: LowRankLinear, dense: nn.Module, moment: torch.Tensor, name: str, report: UpdateReport
) -> None:
    weight = dense_weight(dense)
    up, down = module.up.weight, module.down.weight
    before = output_error(weight, up, down, moment)
    candidate = update_up_factor(weight, down, moment)
    after = output_error(weight, candidate, down, moment)
    if after <= before:
        up.data.copy_(candidate.to(dtype=up.dtype, device=up.device))
    else:
        report.rejected.append(name)
        after = before
    report.errors[name] = (before, after)
    logger.debug("update `%s`: output error %.4f -> %.4f", name, before, after)
