"""The calibration pass one transformer block at a time: the statistics of [`collect`], holding one block's weights.

The model arrives with its non-block parts (embeddings, final norm, head) materialised and its blocks (the entries of
one `nn.ModuleList`) on the `meta` device; `load_block(name, block)` materialises a block in place and
`free_block(name, block)` returns it to `meta`. Each block is replaced by a stub in the list while the pass runs, so
the model's own forward code (masks, rotary embeddings, the head and the loss) still runs around the blocks:

1. **Capture.** Per batch, the model runs up to the first block; the stub records the block's inputs (hidden states
   and keyword arguments such as the attention mask and position embeddings) and the batch. The other stubs check
   that every block is called once per forward pass, in order (no weight sharing, no encoder-decoder).
2. **Forward, block by block.** Block ``i`` is loaded, every batch's hidden states go through it (its forward
   statistics collected by the collector's hooks when no gradient is needed), the outputs replace the inputs and the
   block is freed. With backward statistics the inputs of every block (the block-boundary hidden states) are kept on
   the CPU instead, without hooks.
3. **Loss.** (Backward statistics, or targets outside the blocks.) The model runs again with every stub returning the
   last block's output, as a leaf that requires a gradient, so the loss is exactly the model's; its gradient at that
   leaf is the gradient at the last boundary.
4. **Backward, block by block in reverse.** Block ``i`` is loaded again, its forward pass recomputed with gradients
   from the stored boundary, and the boundary gradient propagated through it with `torch.autograd.grad`; the
   collector's hooks see every targeted layer's input and output gradient exactly as in a whole-model backward pass
   and accumulate the same per-example statistics.

The sums, checks and divisions are the collector's ([`~hf_fwsvd.statistics.collector.finish`]), so both passes
return the same statistics up to floating-point summation order. Memory: one block's weights plus its activations
for one batch, the non-block weights, and the hidden states of every calibration batch at one boundary (forward
statistics) or at every boundary (backward statistics: ``blocks x tokens x hidden`` floats, on the CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import ProcessInfo
from .base import Statistics
from .collector import (
    _batch_size,
    _frozen_state,
    _Hooks,
    _move,
    checked_loss,
    finish,
    input_device,
    prepare_hooks,
    resolve_loss,
)

__all__ = ["BlockwiseUnsupported", "collect_blockwise"]

logger = logging.getLogger(__name__)


class BlockwiseUnsupported(ValueError):
    """The model's structure does not allow a block-by-block pass (raised before any block but the first runs)."""


class _Stop(Exception):
    """Ends a capture forward pass after the last block was called."""


@dataclass
class _Run:
    """One calibration batch: its inputs and the keyword arguments every block receives."""

    batch: Any
    mask: torch.Tensor | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class _State:
    mode: str = "capture"  # "capture" or "replay"
    calls: list[int] = field(default_factory=list)
    captured: tuple[tuple[Any, ...], dict[str, Any], torch.Tensor] | None = None
    first_block: nn.Module | None = None
    tuple_output: bool = False
    value: torch.Tensor | None = None


def _hidden_and_rest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest
    raise BlockwiseUnsupported("A transformer block was called without hidden states as its first argument.")


def _first(output: Any, state: _State) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]) and all(x is None for x in output[1:]):
        state.tuple_output = True
        return output[0]
    raise BlockwiseUnsupported(
        f"A transformer block returned {type(output).__name__} (not its hidden states alone); the block-wise pass "
        "cannot pass it on."
    )


class _Stub(nn.Module):
    """Stands in for block `index` in the block list (attributes the model reads are looked up on the real block)."""

    def __init__(self, index: int, count: int, block: nn.Module, state: _State) -> None:
        super().__init__()
        self.index, self.count = index, count
        self.__dict__["_block"] = block  # not registered: the real block stays out of the model while stubbed
        self.__dict__["_state"] = state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__["_state"]
        state.calls.append(self.index)
        if state.mode == "capture":
            if self.index == 0:
                hidden, rest, rest_kwargs = _hidden_and_rest(args, kwargs)
                with torch.no_grad():
                    output = _first(state.first_block(hidden, *rest, **rest_kwargs), state)
                state.captured = (rest, rest_kwargs, hidden)
                value = output
            else:
                value = _hidden_and_rest(args, kwargs)[0]
            if self.index == self.count - 1:
                raise _Stop
        else:
            value = state.value
        return (value,) if state.tuple_output else value


def _block_list(model: nn.Module, blocks: list[str]) -> tuple[nn.ModuleList, list[nn.Module]]:
    parents = {name.rpartition(".")[0] for name in blocks}
    if len(parents) != 1:
        raise BlockwiseUnsupported(
            f"The blocks come from {len(parents)} module lists ({', '.join(sorted(parents))}); the block-wise pass "
            "handles one stack of blocks (not encoder-decoder models)."
        )
    parent = model.get_submodule(parents.pop())
    real = list(parent)
    if [f"{name}" for name in blocks] != [f"{blocks[0].rpartition('.')[0]}.{i}" for i in range(len(real))]:
        raise BlockwiseUnsupported("The block names do not cover their module list in order.")
    seen: dict[int, str] = {}
    for name, block in zip(blocks, real, strict=True):
        for param in block.parameters():
            if id(param) in seen:
                raise BlockwiseUnsupported(f"`{name}` shares weights with `{seen[id(param)]}`.")
            seen[id(param)] = name
    if len({id(block) for block in real}) != len(real):
        raise BlockwiseUnsupported("One block module appears several times in the block list (weight sharing).")
    return parent, real


def _check_order(state: _State, count: int, batch_index: int) -> None:
    if state.calls != list(range(count)):
        raise BlockwiseUnsupported(
            f"The model called its blocks in the order {state.calls[:8]} on batch {batch_index}, not once each in "
            "order; the block-wise pass needs a plain stack of blocks."
        )


def collect_blockwise(
    model: nn.Module,
    blocks: list[str],
    load_block: Callable[[str, nn.Module], None],
    free_block: Callable[[str, nn.Module], None],
    batches: Iterable[Any],
    modules: dict[str, nn.Module],
    statistics: Iterable[str],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
    fisher_estimator: str = "empirical",
) -> Statistics:
    """[`~hf_fwsvd.statistics.collect`], one block at a time (see the module docstring); single process only.

    Args:
        model (`nn.Module`): The model, its non-block weights materialised and its blocks on `meta`.
        blocks (`list[str]`): Names of the blocks, the entries of one `nn.ModuleList`, in order.
        load_block (`Callable[[str, nn.Module], None]`): Materialises the weights of the named block (the module
            given, which is out of the model while the pass runs) in place.
        free_block (`Callable[[str, nn.Module], None]`): Returns the named block to the `meta` device.
        batches, modules, statistics, loss_fn, show_progress, fisher_estimator: As for `collect`.

    Returns:
        [`Statistics`], as `collect` returns them.

    Raises:
        [`BlockwiseUnsupported`]: When the model is not a plain stack of blocks (before any block but the first ran).
        `ValueError`: As `collect` does.
    """
    loss_fn = resolve_loss(loss_fn, fisher_estimator)
    wanted, hooks = prepare_hooks(modules, statistics, fisher_estimator)
    if hooks is None:
        return Statistics()
    backward = bool(hooks.backward_stats)
    parent, real = _block_list(model, blocks)
    outside = [name for name in modules if not any(name.startswith(block + ".") for block in blocks)]
    state = _State()
    was_training, requires_grad = _frozen_state(model)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False  # no key/value cache handed to the blocks
    loaded: set[str] = set()

    def load(index: int) -> nn.Module:
        if blocks[index] in loaded:
            return real[index]
        load_block(blocks[index], real[index])
        loaded.add(blocks[index])
        return real[index]

    def free(index: int) -> None:
        free_block(blocks[index], real[index])
        loaded.discard(blocks[index])

    try:
        for index, block in enumerate(real):
            parent[index] = _Stub(index, len(real), block, state)
        device = input_device(model)
        state.first_block = load(0)
        runs, hidden = _capture(model, batches, outside, state, len(real), hooks)
        state.first_block = None
        if not runs:
            raise ValueError("The calibration data produced no batches: FWSVD needs at least one calibration example.")
        boundaries = _forward(real, runs, hidden, hooks, backward, load, free, device, show_progress)
        if backward:
            grads = _head(model, runs, boundaries[-1], hooks, state, loss_fn, device, len(real))
            _backward(real, runs, boundaries[:-1], grads, hooks, load, free, device, show_progress)
        elif outside:
            _head(model, runs, boundaries[-1], hooks, state, None, device, len(real))
    finally:
        hooks.detach()
        for index, block in enumerate(real):
            parent[index] = block
        for name in list(loaded):
            free_block(name, real[blocks.index(name)])
        if use_cache is not None:
            config.use_cache = use_cache
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, False))
        model.train(was_training)
    return finish(hooks, modules, wanted, ProcessInfo(0, 1, torch.device("cpu")))


def _capture(
    model: nn.Module, batches: Iterable[Any], outside: list[str], state: _State, count: int, hooks: _Hooks
) -> tuple[list[_Run], list[torch.Tensor]]:
    """Every batch's inputs of the first block (checking the block order and that no target runs before it)."""
    device = input_device(model)
    early: list[str] = []

    def flag(name: str) -> Callable[..., None]:
        return lambda *_: early.append(name) if not state.calls else None

    handles = [hooks.modules[name].register_forward_hook(flag(name)) for name in outside]
    runs: list[_Run] = []
    hidden: list[torch.Tensor] = []
    try:
        for batch in batches:
            batch = _move(batch, device)
            state.mode, state.calls, state.captured = "capture", [], None
            try:
                with torch.no_grad():
                    if isinstance(batch, dict):
                        model(**{key: value for key, value in batch.items() if key != "labels"})
                    else:
                        model(batch)
            except _Stop:
                pass
            if early:
                raise BlockwiseUnsupported(f"The targeted module `{early[0]}` runs before the first block.")
            _check_order(state, count, len(runs))
            args, kwargs, states = state.captured
            state.captured = None
            runs.append(_Run(batch, batch.get("attention_mask") if isinstance(batch, dict) else None, args, kwargs))
            hidden.append(states.detach().cpu())
            hooks.samples += _batch_size(batch)
    finally:
        for handle in handles:
            handle.remove()
    return runs, hidden


def _run_block(block: nn.Module, states: torch.Tensor, run: _Run, device: torch.device) -> torch.Tensor:
    return _first(block(states.to(device), *run.args, **run.kwargs), _State())


def _forward(
    real: list[nn.Module],
    runs: list[_Run],
    hidden: list[torch.Tensor],
    hooks: _Hooks,
    backward: bool,
    load: Callable[[int], nn.Module],
    free: Callable[[int], None],
    device: torch.device,
    show_progress: bool,
) -> list[list[torch.Tensor]]:
    """Run every batch through the blocks in order; the boundaries kept (all with `backward`, else the last)."""
    boundaries = [hidden]
    if not backward:
        hooks.attach()
    for index in tqdm(range(len(real)), desc="Blocks (forward)", unit="block", disable=not show_progress):
        block = load(index)
        outputs = []
        for run, states in zip(runs, boundaries[-1], strict=True):
            hooks.mask = run.mask
            with torch.no_grad():
                outputs.append(_run_block(block, states, run, device).detach().cpu())
        free(index)
        boundaries = [*boundaries, outputs] if backward else [outputs]
    if not backward:
        hooks.detach()
    return boundaries


def _head(
    model: nn.Module,
    runs: list[_Run],
    last: list[torch.Tensor],
    hooks: _Hooks,
    state: _State,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    device: torch.device,
    count: int,
) -> list[torch.Tensor]:
    """Run the model after its blocks (each stub returning the last block's output) for the targets there and, with
    `loss_fn`, the gradient of each batch's loss at the last block's output."""
    hooks.attach()
    grads = []
    try:
        for index, (run, states) in enumerate(zip(runs, last, strict=True)):
            hooks.mask = run.mask
            state.mode, state.calls = "replay", []
            if loss_fn is None:
                state.value = states.to(device)
                with torch.no_grad():
                    if isinstance(run.batch, dict):
                        model(**{key: value for key, value in run.batch.items() if key != "labels"})
                    else:
                        model(run.batch)
            else:
                with torch.enable_grad():
                    state.value = states.to(device).requires_grad_(True)
                    loss = checked_loss(loss_fn(model, run.batch), index)
                    (grad,) = torch.autograd.grad(loss, state.value)
                hooks.end_batch()
                grads.append(grad.detach().cpu())
            state.value = None
            _check_order(state, count, index)
    finally:
        hooks.detach()
    return grads


def _backward(
    real: list[nn.Module],
    runs: list[_Run],
    boundaries: list[list[torch.Tensor]],
    grads: list[torch.Tensor],
    hooks: _Hooks,
    load: Callable[[int], nn.Module],
    free: Callable[[int], None],
    device: torch.device,
    show_progress: bool,
) -> None:
    """Propagate the boundary gradients back through the blocks, recomputing each one's forward pass with hooks."""
    hooks.attach()
    try:
        for index in tqdm(
            reversed(range(len(real))), total=len(real), desc="Blocks (backward)", unit="block",
            disable=not show_progress,
        ):  # fmt: skip
            block = load(index)
            for number, run in enumerate(runs):
                hooks.mask = run.mask
                with torch.enable_grad():
                    states = boundaries[index][number].to(device).requires_grad_(True)
                    output = _run_block(block, states, run, device)
                    (grad,) = torch.autograd.grad(output, states, grad_outputs=grads[number].to(device))
                hooks.end_batch()
                grads[number] = grad.detach().cpu()
            free(index)
            boundaries[index] = []
    finally:
        hooks.detach()
