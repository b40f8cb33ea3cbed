"""Empirical Fisher importances, reduced to one value per input feature of each targeted linear layer.

For a linear layer ``y = x W^T + b`` the gradient of a loss ``L`` w.r.t. ``W`` is ``g^T x`` with ``g = dL/dy``.
We read ``x`` with a forward hook and ``g`` with a hook on the layer's output, form each example's weight gradient,
square it, sum it over output features (the paper's row sum in its ``in x out`` layout) and add it to an fp32 vector
of length ``in_features``. No parameter ever gets a ``.grad``: all parameters are frozen during estimation and
gradients flow only through activations, so the extra memory is the sum of the ``in_features`` of the targets plus
one transient ``out x in`` matrix.

The importance of input feature ``i`` of a layer is ``F_i = 1/N sum_n sum_o (dL_n/dW_oi)^2`` over the ``N``
calibration examples, where ``L_n`` is example ``n``'s loss. The per-example gradients are recovered from the gradient
of the batch-mean loss by scaling with the batch size, which is exact when the model's loss is a mean over examples
(classification, regression) and a close approximation when it is a mean over tokens (causal LM).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import ProcessInfo, all_reduce_sum, process_info, shard_batches
from .layers import dense_weight, is_supported_linear

__all__ = ["estimate_fisher", "model_loss"]

logger = logging.getLogger(__name__)


def model_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The default loss: a transformers model's own ``outputs.loss`` computed from ``batch["labels"]``."""
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returned no loss for the calibration batch (keys: {sorted(batch)}). FWSVD needs "
            "a task loss: load the model with a task head (AutoModelForSequenceClassification, ...ForCausalLM) and "
            "give labelled calibration data, pass `importances=`, or use `method='svd'`."
        )
    return loss


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
    return batch


class _FisherHooks:
    """Forward/backward hooks that accumulate per-input-feature squared-gradient sums for a set of modules."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.leaves: list[torch.Tensor] = []
        self.handles: list[Any] = []
        self.samples = 0

    def attach(self) -> None:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre_hook))
            self.handles.append(module.register_forward_hook(self._make_forward_hook(name)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.leaves.clear()

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        # Parameters are frozen, so the first targeted layer's input carries no gradient: give it one (a detached
        # leaf used only by this layer) so gradients flow through every targeted layer's output.
        hidden = args[0]
        if not torch.is_tensor(hidden) or hidden.requires_grad or not hidden.is_floating_point():
            return None
        leaf = hidden.detach().requires_grad_(True)
        self.leaves.append(leaf)
        return (leaf, *args[1:])

    def _make_forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if torch.is_tensor(output) and output.requires_grad:
                hidden = args[0]
                output.register_hook(lambda grad: self._accumulate(name, hidden, grad))

        return hook

    def _accumulate(self, name: str, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            inputs = hidden.detach().to(torch.float32)
            grads = grad.detach().to(torch.float32)
            batch = inputs.shape[0] if inputs.ndim >= 2 else 1
            if inputs.ndim <= 2:
                # one example per row: (dL_n/dW)_oi = B g_no x_ni, so sum_o (.)^2 = B^2 |g_n|^2 x_ni^2
                rows_in = inputs.reshape(-1, inputs.shape[-1])
                rows_grad = grads.reshape(-1, grads.shape[-1])
                total = (rows_grad.square().sum(-1)) @ rows_in.square()
            else:
                total = torch.zeros(inputs.shape[-1], dtype=torch.float32, device=inputs.device)
                for example_in, example_grad in zip(inputs, grads, strict=True):
                    weight_grad = example_grad.reshape(-1, grads.shape[-1]).T @ example_in.reshape(
                        -1, inputs.shape[-1]
                    )
                    total += weight_grad.square().sum(0)
            total *= batch * batch
            if name in self.sums:
                self.sums[name] += total
            else:
                self.sums[name] = total


def _frozen_state(model: nn.Module) -> tuple[bool, dict[str, bool]]:
    return model.training, {name: param.requires_grad for name, param in model.named_parameters()}


def _input_device(model: nn.Module) -> torch.device:
    """Where calibration batches go: the first materialised parameter's device, or, for a model dispatched with an
    offloading `device_map` (its weights on `meta` until accelerate's hooks load them), the first execution device."""
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict):
        for value in device_map.values():
            if value not in ("disk", "meta"):
                return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
        return torch.device("cpu")
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _reduce(
    hooks: _FisherHooks, modules: dict[str, nn.Module], info: ProcessInfo, failed: bool
) -> tuple[dict[str, torch.Tensor], list[str], int, int]:
    """Sum the per-feature sums, the example count, which modules got a gradient and failures over all processes.

    Returns:
        `(sums, missing, samples, failures)`: summed fp32 vectors of the modules some process saw, the modules no
        process saw, the total example count and how many processes failed.
    """
    sizes = {name: int(dense_weight(module).shape[1]) for name, module in modules.items()}
    flat = torch.cat([hooks.sums.get(name, torch.zeros(size)).to(torch.float32).cpu() for name, size in sizes.items()])
    counts = torch.tensor([hooks.samples, int(failed), *(int(name in hooks.sums) for name in sizes)])
    flat, counts = all_reduce_sum(flat, info), all_reduce_sum(counts, info)
    sums, missing = {}, []
    vectors = flat.split(list(sizes.values()))
    for name, vector, seen in zip(sizes, vectors, counts[2:].tolist(), strict=True):
        if seen:
            sums[name] = vector
        else:
            missing.append(name)
    return sums, missing, int(counts[0]), int(counts[1])


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if torch.is_tensor(value) and value.ndim >= 1:
                return int(value.shape[0])
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    raise ValueError(f"Cannot tell the batch size of a calibration batch of type {type(batch).__name__}.")


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module] | list[str],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = model_loss,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Estimate per-input-feature empirical Fisher importances of `modules` on calibration `batches`.

    The model runs in eval mode (no dropout) with every parameter frozen; afterwards its mode and `requires_grad`
    flags are restored, no hook is left and no parameter has a gradient.

    Under ``accelerate launch`` / ``torchrun`` with several processes, each process passes the same `batches` and
    its own copy of the model (not wrapped in DDP); each works on a round-robin share of whole batches (see
    [`~hf_fwsvd.distributed.shard_batches`]), the sums and example counts are added over processes, and every process
    returns the same importances, equal to a single-process run on the same batches up to summation order. A model
    dispatched with `device_map` (accelerate hooks, offloading included) works too.

    Args:
        model (`nn.Module`): The model; `loss_fn(model, batch)` must return a scalar task loss.
        batches (`Iterable`): Calibration batches (dicts of tensors for transformers models).
        modules (`dict[str, nn.Module]` or `list[str]`): Target linear layers, or their names in `model`.
        loss_fn (`Callable`, *optional*): Loss of one batch; defaults to the model's own `outputs.loss`.
        show_progress (`bool`, *optional*, defaults to `True`): Show a tqdm progress bar over batches.

    Returns:
        `dict[str, torch.Tensor]`: Module name -> fp32 importance vector of length ``in_features`` (on CPU).
    """
    if not isinstance(modules, dict):
        modules = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        if not is_supported_linear(module):
            raise ValueError(f"`{name}` is a {type(module).__name__}, not a linear layer; cannot estimate its Fisher.")
    device = _input_device(model)
    info = process_info()
    was_training, requires_grad = _frozen_state(model)
    hooks = _FisherHooks(modules)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    hooks.attach()
    error: Exception | None = None
    try:
        shard = shard_batches(batches, info)
        total = len(shard) if hasattr(shard, "__len__") else None
        progress = show_progress and info.is_main
        for batch in tqdm(shard, total=total, desc="Fisher", unit="batch", disable=not progress):
            batch = _move(batch, device)
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"The calibration loss is {loss.item()} on batch {hooks.samples // max(_batch_size(batch), 1)}"
                        ": check the labels and inputs, and estimate in float32."
                    )
                if not loss.requires_grad:
                    raise ValueError("The calibration loss does not depend on any targeted module; nothing to weigh.")
                if hooks.leaves:
                    torch.autograd.grad(loss, hooks.leaves, allow_unused=True)
                else:  # the inputs already carry gradients (e.g. `inputs_embeds` that require grad)
                    loss.backward()
            hooks.leaves.clear()
            hooks.samples += _batch_size(batch)
    except Exception as exc:
        if not info.is_distributed:
            raise
        error = exc  # take part in the collective anyway, so the other processes fail instead of hanging
    finally:
        hooks.detach()
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
        model.train(was_training)
    sums, missing, samples, failures = _reduce(hooks, modules, info, failed=error is not None)
    if error is not None:
        raise error
    if failures:
        raise RuntimeError(f"Fisher estimation failed on {failures} other process(es); see their error messages.")
    if samples == 0:
        raise ValueError("The calibration data produced no batches: FWSVD needs at least one calibration example.")
    if missing:
        raise ValueError(
            f"No gradient reached {len(missing)} targeted module(s), e.g. `{missing[0]}`: they do not affect the task "
            "loss on this data. Exclude them with `modules_to_not_convert` or use `method='svd'`."
        )
    return {name: sums[name] / samples for name in modules}
