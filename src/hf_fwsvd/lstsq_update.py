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

Three variants (options of [`sequential_update`], same guarantee):

- ``refit="both"`` refits both factors: the best rank-``r`` ``A B`` for the same objective, i.e. the whitened
  truncation of ``W`` redone with the compressed model's ``C`` (`hf_fwsvd.factorize.factorize`). It never does worse
  than refitting ``A`` alone, but it replaces the method's own choice of ``B`` (e.g. Fisher-weighted) by the plain
  activation-weighted one.
- ``target="dense"`` fits the **dense model's** outputs instead of the dense module's outputs on the compressed inputs:
  ``min_A ||X_d W^T - X_c B^T A^T||`` with ``X_d`` the inputs the module sees in the dense model (propagated block by
  block alongside the compressed ones), so each module also absorbs the error the earlier blocks left:
  ``A* = W C_dc B^T (B C_cc B^T)^{-1}`` with ``C_dc = X_d^T X_c``, ``C_cc = X_c^T X_c``. One more block pass per
  block. Only with ``refit="up"`` (refitting both factors to the dense outputs needs ``C_cc^{-1}``, which amplifies
  the directions the calibration barely reached).
- ``intercept=True`` also fits a bias of `up` (bias compensation): the least squares of ``[A, b]`` on the inputs
  with a trailing 1, i.e. ``A`` on the centred moments and ``b`` from the means. Measured worse on SmolLM2-135M.
  With ``bias_token_weights``, ``A`` is fitted as without a bias (every token, uncentred moments) and ``b`` is the
  weighted mean of the output error ``A`` leaves, so tokens of weight 0 (e.g. the first token of each passage, whose
  attention-sink activations dominate some modules' outputs) do not set it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .factorize import factorize
from .layers import LowRankLinear, dense_weight
from .progress import progress_enabled

__all__ = ["REFITS", "TARGETS", "UpdateReport", "output_error", "sequential_update", "update_up_factor"]

logger = logging.getLogger(__name__)

DENSE_TARGET_WARNING = (
    "sequential_update(target='dense') is experimental: on SmolLM2-135M at 80% kept it raised the development "
    "perplexity from 42.2 (target='compressed') to 1359.6. Use the default target='compressed' unless you measure it."
)

# Relative ridge added to ``B C B^T`` (scaled by its largest diagonal entry) so that a rank-deficient ``C`` solves.
RIDGE = 1e-8
REFITS = ("up", "both")
TARGETS = ("compressed", "dense")


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


def output_error(
    weight: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    second_moment: torch.Tensor,
    cross_moment: torch.Tensor | None = None,
    target_moment: torch.Tensor | None = None,
) -> float:
    """Relative output error ``||X_d W^T - X_c (A B)^T||_F / ||X_d W^T||_F`` from moments (float64).

    With only `second_moment` (``C = X^T X``, ``X_d = X_c = X``) it is ``sqrt(tr((W - A B) C (W - A B)^T) /
    tr(W C W^T))``. `cross_moment` ``X_d^T X_c`` and `target_moment` ``X_d^T X_d`` give the error against the dense
    model's outputs (``target="dense"`` of [`sequential_update`]).
    """
    dense = weight.detach().to(torch.float64)
    up, down = up.detach().to(torch.float64), down.detach().to(torch.float64)
    moment = second_moment.detach().to(torch.float64)
    if cross_moment is None:
        residual = dense - up @ down
        numerator = ((residual @ moment) * residual).sum().clamp_min(0)
        denominator = ((dense @ moment) * dense).sum().clamp_min(1e-300)
        return float((numerator / denominator).sqrt())
    cross = cross_moment.detach().to(torch.float64)
    target = target_moment.detach().to(torch.float64)
    denominator = ((dense @ target) * dense).sum()
    projected = (down @ moment) @ down.T  # B C_cc B^T
    numerator = denominator - 2 * ((dense @ cross @ down.T) * up).sum() + ((up @ projected) * up).sum()
    return float((numerator.clamp_min(0) / denominator.clamp_min(1e-300)).sqrt())


def update_up_factor(
    weight: torch.Tensor, down: torch.Tensor, second_moment: torch.Tensor, cross_moment: torch.Tensor | None = None
) -> torch.Tensor:
    """The least-squares `up` factor ``W C B^T (B C B^T)^{-1}`` for a fixed `down` ``B`` (float64 solve).

    Args:
        weight (`torch.Tensor`): The dense weight ``W`` (``out x in``).
        down (`torch.Tensor`): The kept `down` factor ``B`` (``rank x in``).
        second_moment (`torch.Tensor`): ``C = X^T X`` (any positive scale) of the inputs to fit (``in x in``).
        cross_moment (`torch.Tensor`, *optional*): ``X_d^T X_c`` (same scale) to fit the outputs ``X_d W^T`` of other
            inputs ``X_d`` from ``X_c``: then ``A* = W C_dc B^T (B C B^T)^{-1}``. Defaults to `second_moment`.

    Returns:
        `torch.Tensor`: float32 ``out x rank``.
    """
    dense = weight.detach().to(torch.float64)
    basis = down.detach().to(torch.float64)
    moment = second_moment.detach().to(torch.float64)
    cross = moment if cross_moment is None else cross_moment.detach().to(torch.float64)
    gram = (basis @ moment) @ basis.T  # B C B^T  (rank x rank)
    gram = (gram + gram.T) / 2
    scale = gram.diagonal().abs().max().clamp_min(1e-300)
    identity = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    rhs = dense @ (cross @ basis.T)  # W C_dc B^T  (out x rank)
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
    refit: str = "up",
    target: str = "compressed",
    token_weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
    intercept: bool = False,
    bias_token_weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
    show_progress: bool | None = None,
) -> UpdateReport:
    """Refit the `up` factor of every compressed module in `dense_modules`, block by block (see the module docstring).

    Args:
        model (`nn.Module`): The compressed model (its targets already `LowRankLinear`); updated in place.
        dense_modules (`dict[str, nn.Module | torch.Tensor]`): Compressed module name -> the dense module it
            replaced, or its dense weight (``out x in``; an `nn.Linear` with the factor's bias is built around it).
            They are swapped in temporarily and never modified.
        batches (`Iterable[dict]`): Calibration batches (dicts with `input_ids`, optionally `attention_mask`).
        refit (`str`, *optional*, defaults to `"up"`): `"up"` (SVD-LLM: the `up` factor only) or `"both"` (the
            whitened truncation redone on the compressed model's inputs; the rank is kept).
        target (`str`, *optional*, defaults to `"compressed"`): `"compressed"` (SVD-LLM: the dense module's outputs
            on the compressed model's inputs) or `"dense"` (the dense model's outputs; `refit="up"` only).
            Experimental: `"dense"` lowers every module's error against the dense outputs on the calibration tokens
            and still destroyed SmolLM2-135M at 80% kept (development perplexity 1359.6 against 42.2 for the
            default, benchmarks/README.md), so it logs a warning.
        token_weights (`Mapping[str, Sequence[torch.Tensor]]`, *optional*): Module name -> one weight per token of
            each batch (shaped like the module's input without its last dimension, batches in the order of
            `batches`), e.g. the dense model's ``|g_t|^2`` from
            [`~hf_fwsvd.token_weights.output_gradient_token_weights`]: every moment becomes ``X^T diag(w) X``, so the
            fit weighs the tokens as `fisher_whiten` / `kfac_whiten`'s truncation does. Unweighted when `None`.
            Measured worse than unweighted after `kfac_whiten` on SmolLM2-135M at 80% kept with 8,192 calibration
            tokens (development perplexity 40.24 against 39.66, benchmarks/README.md); with 131,072 better at 80%
            kept (36.83 against 36.97) and worse at 60% (101.6 against 99.1), and behind no update at both (36.53,
            92.1), so no method uses it.
        intercept (`bool`, *optional*, defaults to `False`): Also fit a bias of `up` (bias compensation): the least
            squares of ``[A, b]`` on the inputs with a constant 1 appended, which absorbs the mean of the output
            error. A module without a bias gains one (``out`` parameters), which the FWSVD checkpoint cannot store
            (`save_pretrained` refuses such a model). `refit="up"` only. Measured worse on SmolLM2-135M at 80% kept
            (development perplexity 44.84 against 39.66, benchmarks/README.md, "Bias compensation and the
            calibration context length"), so no method uses it.
        bias_token_weights (`Mapping[str, Sequence[torch.Tensor]]`, *optional*): With `intercept`, the tokens the
            bias is fitted on (shaped like `token_weights`): `A` is then fitted as without `intercept` (the
            uncentred moments of every token, weighted by `token_weights` if given) and the bias is the
            `bias_token_weights`-weighted mean of the output error that `A` leaves, the bias that minimises the
            error of those tokens given `A`. The report's errors are those of the `A` step. With every token but
            each passage's first, measured neutral on SmolLM2-135M at 80% kept (development perplexity 39.66 with
            and without it, benchmarks/README.md, "Attention-sink modules kept dense"), so no method uses it.
        show_progress (`bool`, *optional*): A progress bar over the blocks. Defaults to
            [`~hf_fwsvd.progress.progress_enabled`]: shown, unless `compress(..., show_progress=False)` runs the
            update.

    Returns:
        [`UpdateReport`]

    Raises:
        `ValueError`: When a name is not a `LowRankLinear` in `model` or is outside every transformer block, for an
            unknown `refit` / `target`, or when `token_weights` lacks a module or a batch.
    """
    if refit not in REFITS:
        raise ValueError(f"Unknown refit {refit!r}; choose one of {', '.join(map(repr, REFITS))}.")
    if target not in TARGETS:
        raise ValueError(f"Unknown target {target!r}; choose one of {', '.join(map(repr, TARGETS))}.")
    if intercept and refit != "up":
        raise ValueError("intercept=True fits the `up` factor and its bias; use refit='up'.")
    if bias_token_weights is not None and not intercept:
        raise ValueError("`bias_token_weights` choose the tokens a bias is fitted on; pass intercept=True with them.")
    if refit == "both" and target == "dense":
        raise ValueError("refit='both' fits the compressed model's own outputs only; use target='compressed'.")
    if target == "dense":
        logger.warning(DENSE_TARGET_WARNING)
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
        dense_states = [args[0] for args, _, _ in cached] if target == "dense" else None
        if show_progress is None:
            show_progress = progress_enabled()
        for block_name in tqdm(
            blocks[first : last + 1], desc="Least-squares update", unit="block", disable=not show_progress
        ):
            block = model.get_submodule(block_name)
            names = by_block.get(block_name, [])
            moments, next_dense = _collect_dense_moments(
                model, block, names, dense_modules, cached, dense_states, token_weights, intercept, bias_token_weights
            )
            for name in names:
                module = model.get_submodule(name)
                if bias_token_weights is not None:
                    _update_with_weighted_bias(module, dense_modules[name], moments[name], name, report)
                elif intercept:
                    _update_with_intercept(module, dense_modules[name], moments[name], name, report)
                else:
                    _update_one(module, dense_modules[name], moments[name], name, report, refit)
            dense_states = next_dense
            cached = [
                ((_block_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs, mask)
                for args, kwargs, mask in cached
            ]
    finally:
        model.train(was_training)
    return report


# C_cc, and C_dc, C_dd for target="dense"; then, with `bias_token_weights`, the weighted sums of the compressed and
# (target="dense") dense inputs with their trailing 1
Moments = tuple[torch.Tensor | None, ...]


def _collect_dense_moments(
    model: nn.Module,
    block: nn.Module,
    names: list[str],
    dense_modules: dict[str, nn.Module],
    cached: list[tuple[tuple, dict, torch.Tensor | None]],
    dense_states: list[torch.Tensor] | None = None,
    token_weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
    intercept: bool = False,
    bias_token_weights: Mapping[str, Sequence[torch.Tensor]] | None = None,
) -> tuple[dict[str, Moments], list[torch.Tensor] | None]:
    """The float64 moments of each dense module's inputs while the dense version of `block` runs on `cached`:
    ``X_c^T X_c``, and with `dense_states` (the dense model's hidden states entering the block, one per batch) also
    ``X_d^T X_c`` and ``X_d^T X_d``, where ``X_d`` are the inputs in the dense model; then also the dense model's
    hidden states leaving the block. With `token_weights`, each moment is ``X^T diag(w) X``; with `intercept`, every
    row gets a trailing 1 (the moments are ``(in + 1) x (in + 1)``); with `bias_token_weights` (and `intercept`), the
    moments are followed by ``sum_t w_t [x_c,t; 1]`` and, with `dense_states`, ``sum_t w_t [x_d,t; 1]``."""
    low_rank = {name: model.get_submodule(name) for name in names}
    sums: dict[str, list[torch.Tensor]] = {}
    current: list[torch.Tensor | None] = [None]
    batch_index = [0]
    dense_rows: dict[str, torch.Tensor] = {}
    capturing: list[bool] = [False]
    handles = []

    def add(name: str, index: int, moment: torch.Tensor) -> None:
        entry = sums.setdefault(name, [None] * 5)
        entry[index] = moment if entry[index] is None else entry[index] + moment

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            inputs = args[0].detach().to(torch.float64)
            mask = current[0]
            keep = None
            if mask is not None and inputs.ndim == 3 and tuple(mask.shape) == tuple(inputs.shape[:2]):
                keep = mask.bool()
            rows = inputs if keep is None else inputs[keep]
            rows = rows.reshape(-1, rows.shape[-1])
            if intercept:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            if capturing[0]:  # the dense model's pass: keep the rows until the compressed inputs of this batch arrive
                dense_rows[name] = rows
                return
            weights = None
            if token_weights is not None:
                weights = _batch_weights(token_weights, name, batch_index[0], inputs)
                weights = (weights if keep is None else weights[keep]).reshape(-1, 1)
            weighted = rows if weights is None else rows * weights
            add(name, 0, rows.T @ weighted)
            target = dense_rows.pop(name, None)
            if target is not None:
                add(name, 1, target.T @ weighted)
                target_weighted = target if weights is None else target * weights
                add(name, 2, target.T @ target_weighted)
            if bias_token_weights is not None:
                bias_weights = _batch_weights(bias_token_weights, name, batch_index[0], inputs)
                bias_weights = (bias_weights if keep is None else bias_weights[keep]).reshape(-1, 1)
                add(name, 3, (rows * bias_weights).sum(0))
                if target is not None:
                    add(name, 4, (target * bias_weights).sum(0))

        return hook

    next_dense: list[torch.Tensor] | None = None if dense_states is None else []
    try:
        for name in names:
            model.set_submodule(name, dense_modules[name])
            handles.append(dense_modules[name].register_forward_hook(make_hook(name)))
        for index, (args, kwargs, mask) in enumerate(cached):
            current[0], batch_index[0] = mask, index
            if dense_states is not None:
                capturing[0] = True
                next_dense.append(_block_output(block(dense_states[index], *args[1:], **kwargs)))
                capturing[0] = False
            if names:
                block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for name, module in low_rank.items():
            model.set_submodule(name, module)
    return {name: tuple(entry) for name, entry in sums.items()}, next_dense


def _batch_weights(
    token_weights: Mapping[str, Sequence[torch.Tensor]], name: str, index: int, inputs: torch.Tensor
) -> torch.Tensor:
    """The float64 weights of batch `index` for module `name`, checked against its `inputs` (before masking)."""
    if name not in token_weights:
        raise ValueError(f"`token_weights` has no weights for `{name}`; collect them for every compressed module.")
    per_batch = token_weights[name]
    if index >= len(per_batch):
        raise ValueError(
            f"`token_weights[{name!r}]` has {len(per_batch)} batches, the calibration data more; pass the batches "
            "the weights were collected on."
        )
    weights = per_batch[index].to(device=inputs.device, dtype=torch.float64)
    if tuple(weights.shape) != tuple(inputs.shape[:-1]):
        raise ValueError(
            f"`token_weights[{name!r}]` batch {index} has shape {tuple(weights.shape)}, the module's input "
            f"{tuple(inputs.shape[:-1])} tokens; pass the batches the weights were collected on."
        )
    return weights


def _update_one(
    module: LowRankLinear, dense: nn.Module, moments: Moments, name: str, report: UpdateReport, refit: str = "up"
) -> None:
    weight = dense_weight(dense)
    up, down = module.up.weight, module.down.weight
    moment, cross, target = moments[:3]
    before = output_error(weight, up, down, moment, cross, target)
    if refit == "both":
        factors = factorize(weight.detach().float(), down.shape[0], moment.float(), name=name)
        candidate, new_down = factors.up, factors.down
    else:
        candidate, new_down = update_up_factor(weight, down, moment, cross), down
    after = output_error(weight, candidate, new_down, moment, cross, target)
    if after <= before:
        up.data.copy_(candidate.to(dtype=up.dtype, device=up.device))
        if new_down is not down:
            down.data.copy_(new_down.to(dtype=down.dtype, device=down.device))
    else:
        report.rejected.append(name)
        after = before
    report.errors[name] = (before, after)
    logger.debug("update `%s`: output error %.4f -> %.4f", name, before, after)


def _update_with_intercept(
    module: LowRankLinear, dense: nn.Module, moments: Moments, name: str, report: UpdateReport
) -> None:
    """`_update_one` for `up` and its bias. The moments are of the inputs with a trailing 1, so they hold the sums and
    the token count: ``A`` is solved on the centred moments (well conditioned, unlike the raw ones with a column of
    ones beside small features), ``b = W mu_d + b_0 - A B mu_c``, and the errors are measured exactly on the extended
    system ``[W, b_0] [x; 1]`` against ``[A, b] diag(B, 1) [x; 1]``."""
    weight = dense_weight(dense).detach().to(torch.float64)
    dense_bias = _dense_bias(dense, weight)
    down = module.down.weight.detach().to(torch.float64)
    rank = down.shape[0]
    extended_down = down.new_zeros(rank + 1, down.shape[1] + 1)
    extended_down[:rank, :-1] = down
    extended_down[rank, -1] = 1.0
    extended_weight = torch.cat([weight, dense_bias.reshape(-1, 1)], dim=1)
    bias = module.up.bias
    current_bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.detach().to(weight)
    extended_up = torch.cat([module.up.weight.detach().to(weight), current_bias.reshape(-1, 1)], dim=1)
    moment, cross, target = moments[:3]
    count = moment[-1, -1]
    compressed_mean = moment[:-1, -1] / count
    centred = moment[:-1, :-1] - count * torch.outer(compressed_mean, compressed_mean)
    if cross is None:
        dense_mean, centred_cross = compressed_mean, None
    else:
        dense_mean = cross[:-1, -1] / count
        centred_cross = cross[:-1, :-1] - count * torch.outer(dense_mean, compressed_mean)
    up = update_up_factor(weight, down, centred, centred_cross).to(torch.float64)
    candidate = torch.cat([up, (weight @ dense_mean + dense_bias - up @ (down @ compressed_mean)).reshape(-1, 1)], 1)
    before = output_error(extended_weight, extended_up, extended_down, moment, cross, target)
    after = output_error(extended_weight, candidate, extended_down, moment, cross, target)
    if after > before:
        report.rejected.append(name)
        report.errors[name] = (before, before)
        return
    parameter = module.up.weight
    parameter.data.copy_(up.to(dtype=parameter.dtype, device=parameter.device))
    _set_up_bias(module, candidate[:, rank])
    report.errors[name] = (before, after)
    logger.debug("update `%s` with a bias: output error %.4f -> %.4f", name, before, after)


def _update_with_weighted_bias(
    module: LowRankLinear, dense: nn.Module, moments: Moments, name: str, report: UpdateReport
) -> None:
    """`intercept` with `bias_token_weights`: `_update_one` on the moments without their trailing 1, then
    ``b = (W s_d + b_0 sum_t w_t - A B s_c) / sum_t w_t`` with ``s = sum_t w_t x_t`` (``s_d = s_c`` unless
    ``target="dense"``): the mean output error of the weighted tokens, which it removes."""
    moment, cross, target, compressed_sums, dense_sums = moments
    inner = [None if m is None else m[:-1, :-1] for m in (moment, cross, target)]
    _update_one(module, dense, tuple(inner), name, report)
    total = float(compressed_sums[-1])
    if not total > 0:
        raise ValueError(
            f"`bias_token_weights` give `{name}` no weight on any calibration token, so its bias is undefined; give "
            "some tokens a positive weight."
        )
    dense_sums = compressed_sums if dense_sums is None else dense_sums
    weight = dense_weight(dense).detach().to(torch.float64)
    up = module.up.weight.detach().to(torch.float64)
    down = module.down.weight.detach().to(torch.float64)
    error_sum = (
        weight @ dense_sums[:-1] + _dense_bias(dense, weight) * dense_sums[-1] - up @ (down @ compressed_sums[:-1])
    )
    new_bias = error_sum / total
    _set_up_bias(module, new_bias)
    logger.debug("update `%s`: bias fitted on the weighted tokens, norm %.4g", name, float(new_bias.norm()))


def _dense_bias(dense: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The dense module's bias as `weight`'s dtype and device, zeros when it has none."""
    bias = getattr(dense, "bias", None)
    return weight.new_zeros(weight.shape[0]) if bias is None else bias.detach().to(weight)


def _set_up_bias(module: LowRankLinear, bias: torch.Tensor) -> None:
    """Write `bias` into the `up` factor, adding the parameter (and marking the module) when it has none."""
    parameter = module.up.weight
    new_bias = bias.to(dtype=parameter.dtype, device=parameter.device)
    if module.up.bias is None:
        module.up.bias = nn.Parameter(new_bias, requires_grad=parameter.requires_grad)
        module.bias_added = True  # `save_pretrained` refuses it: the architecture has no bias to load it into
    else:
        module.up.bias.data.copy_(new_bias)
