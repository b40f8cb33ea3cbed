"""The one calibration pass: hooks on the targeted linear layers accumulate every requested statistic.

One hook lifecycle serves every statistic (see `hf_fwsvd.statistics.builtin`). When some statistic needs output
gradients, each batch runs forward and backward with every parameter frozen: the first targeted layer's input is made
a leaf so gradients flow through every targeted output, no parameter ever gets a ``.grad``, and each layer input is
held only until its gradient arrives. Otherwise only forward passes run, under `torch.no_grad()`, with any `labels`
dropped. The model runs in eval mode; afterwards its mode and `requires_grad` flags are restored and no hook is left.

Batches go to the model's input device, which for a model dispatched with an offloading `device_map` is its first
execution device. Under ``accelerate launch`` / ``torchrun`` every process passes the same batches and works on a
round-robin share of whole batches (`hf_fwsvd.distributed.shard_batches`); sums and counts are added over processes,
so every process returns the single-process result up to summation order.

Weight sharing (ALBERT uses one layer several times per forward pass): a backward statistic of a module used ``k > 1``
times in a batch is formed from the per-example gradient summed over its uses, ``sum_u G_nu^T X_nu``, by joining the
uses along the token axis once the backward pass is done, never from a sum of per-use squares.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import ProcessInfo, all_reduce_sum, process_info, shard_batches
from ..layers import dense_weight, is_supported_linear
from .base import Observation, Statistic, Statistics
from .registry import get_statistic

__all__ = ["FISHER_ESTIMATORS", "collect", "input_device", "model_loss", "sampled_label_loss"]

logger = logging.getLogger(__name__)

# How backward statistics estimate the Fisher (`FWSVDConfig.fisher_estimator`):
# "empirical": squared per-example gradients on the calibration labels (the paper);
# "true": the same, with every label drawn from the model's own predictive distribution (`sampled_label_loss`);
# "batch": squared gradients of each batch-mean loss (what common FWSVD code computes).
FISHER_ESTIMATORS = ("empirical", "true", "batch")


def model_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The default loss: a transformers model's own ``outputs.loss`` computed from ``batch["labels"]``."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"A calibration batch is a {type(batch).__name__}, not a dict of model inputs (a DataLoader over a "
            "TensorDataset yields tuples). Yield dicts such as {'input_ids': ..., 'attention_mask': ..., 'labels': "
            "...} (e.g. with a `collate_fn`), or pass `loss_fn(model, batch)` that unpacks your batches."
        )
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returned no loss for the calibration batch (keys: {sorted(batch)}). FWSVD needs "
            "a task loss: load the model with a task head (AutoModelForSequenceClassification, ...ForCausalLM) and "
            "give labelled calibration data, pass `importances=`, or use `method='svd'`."
        )
    return loss


def sampled_label_loss(
    model: nn.Module, batch: dict[str, Any], generator: torch.Generator | None = None
) -> torch.Tensor:
    """The task loss on labels drawn from the model's own predictive distribution (the true-Fisher loss).

    The model runs without the batch's labels. For classification logits (``batch x classes``, or ``batch x tokens x
    classes`` for token-level heads and causal LMs) one label per example or token is drawn from ``softmax(logits)``
    and the loss is the cross-entropy, averaged over examples (over the tokens the `attention_mask` keeps, for
    token-level logits). For a one-output regression head (``problem_type="regression"`` or one label) the target is
    ``f(x) + e`` with ``e ~ N(0, 1)`` and the loss is the mean squared error, as transformers computes it.

    Args:
        model (`nn.Module`): A transformers model with a task head (its outputs have `.logits`).
        batch (`dict[str, Any]`): A calibration batch; its `labels`, if any, are ignored.
        generator (`torch.Generator`, *optional*): CPU generator for the draws (reproducible estimates).
    """
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = getattr(model(**inputs), "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__} returned no logits: the true Fisher (`fisher_estimator='true'`) samples labels "
            "from the model's predictions, so it needs a model with a task head."
        )
    config = getattr(model, "config", None)
    regression = getattr(config, "problem_type", None) == "regression" or (logits.ndim == 2 and logits.shape[-1] == 1)
    with torch.no_grad():
        detached = logits.detach().to(torch.float32)
        if regression:
            target = detached + torch.randn(detached.shape, generator=generator).to(detached.device)
        else:
            probs = detached.reshape(-1, detached.shape[-1]).softmax(-1).cpu()
            target = torch.multinomial(probs, 1, generator=generator).reshape(detached.shape[:-1]).to(logits.device)
            mask = inputs.get("attention_mask")
            if logits.ndim == 3 and torch.is_tensor(mask) and tuple(mask.shape) == tuple(target.shape):
                target = target.masked_fill(mask.to(target.device) == 0, -100)
    if regression:
        return nn.functional.mse_loss(logits.float(), target)
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))


def resolve_loss(
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None, fisher_estimator: str
) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The calibration loss of a run: `loss_fn` (default `model_loss`), or for ``fisher_estimator="true"`` the
    seeded `sampled_label_loss`.

    Raises:
        `ValueError`: For an unknown estimator, or ``"true"`` with a custom `loss_fn`.
    """
    if fisher_estimator not in FISHER_ESTIMATORS:
        raise ValueError(
            f"Unknown Fisher estimator {fisher_estimator!r}; choose one of {', '.join(FISHER_ESTIMATORS)}."
        )
    if fisher_estimator == "true":
        if loss_fn not in (None, model_loss):
            raise ValueError(
                "estimator='true' draws the labels from the model and computes its own loss; it cannot be combined "
                "with a custom `loss_fn`. Use the default loss, or estimator='empirical'."
            )
        return functools.partial(sampled_label_loss, generator=torch.Generator().manual_seed(0))
    return loss_fn or model_loss


def input_device(model: nn.Module) -> torch.device:
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


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, (Mapping, tuple, list)):  # dicts, or tuples for a custom `loss_fn` (TensorDataset)
        for value in batch.values() if isinstance(batch, Mapping) else batch:
            if torch.is_tensor(value) and value.ndim >= 1:
                return int(value.shape[0])
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    raise ValueError(f"Cannot tell the batch size of a calibration batch of type {type(batch).__name__}.")


def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in sums:
        sums[name] += value
    else:
        sums[name] = value


def _join_uses(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The inputs (or gradients) of several uses of one module joined along the token axis: ``batch x tokens x f``."""
    batch = tensors[0].shape[0] if tensors[0].ndim >= 2 else 1
    return torch.cat([tensor.reshape(batch, -1, tensor.shape[-1]) for tensor in tensors], dim=1)


class _Hooks:
    """Forward (and output-gradient) hooks accumulating the requested statistics of a set of modules."""

    def __init__(
        self, modules: dict[str, nn.Module], statistics: dict[str, Statistic], estimator: str = "empirical"
    ) -> None:
        self.modules = modules
        self.estimator = estimator
        self.forward_stats = {key: stat for key, stat in statistics.items() if not stat.needs_backward}
        self.backward_stats = {key: stat for key, stat in statistics.items() if stat.needs_backward}
        self.requested = frozenset(statistics)
        self.sums: dict[str, dict[str, torch.Tensor]] = {key: {} for key in statistics}
        self.tokens: dict[str, int] = {}
        self.graded: set[str] = set()
        self.mask: torch.Tensor | None = None
        self.leaves: list[torch.Tensor] = []
        self.uses: dict[str, int] = {}
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles: list[Any] = []
        self.samples = 0

    def attach(self) -> None:
        for name, module in self.modules.items():
            if self.backward_stats:
                self.handles.append(module.register_forward_pre_hook(self._pre_hook))
            self.handles.append(module.register_forward_hook(self._make_forward_hook(name)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.leaves.clear()
        self.pending.clear()

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
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            hidden = args[0]
            if not torch.is_tensor(hidden) or not hidden.is_floating_point():
                return
            if self.forward_stats:
                with torch.no_grad():
                    outputs = output.detach() if torch.is_tensor(output) else None  # a statistic converts it
                    observation = Observation(hidden.detach().to(torch.float32), mask=self.mask, outputs=outputs)
                    for key, stat in self.forward_stats.items():
                        _add(self.sums[key], name, stat.accumulate(observation))
                    self.tokens[name] = self.tokens.get(name, 0) + observation.real_token_count()
            if self.backward_stats and torch.is_tensor(output) and output.requires_grad:
                self.uses[name] = self.uses.get(name, 0) + 1
                # The layer input is held only until its gradient arrives, then released, so activations are freed
                # during the backward pass as autograd frees its own saved tensors (not at the end of it).
                held = [hidden]
                output.register_hook(lambda grad: self._on_gradient(name, held.pop(), grad) if held else None)

        return hook

    def _on_gradient(self, name: str, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        if self.uses.get(name, 1) > 1:  # shared module: wait for every use's gradient (see the module docstring)
            self.pending.setdefault(name, []).append((hidden.detach(), grad.detach()))
            return
        self._accumulate(name, hidden, grad)

    def _accumulate(self, name: str, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            observation = Observation(
                hidden.detach().to(torch.float32),
                grad.detach().to(torch.float32),
                mask=self.mask,
                requested=self.requested,
                estimator=self.estimator,
            )
            for key, stat in self.backward_stats.items():
                _add(self.sums[key], name, stat.accumulate(observation))
            self.graded.add(name)

    def end_batch(self) -> None:
        """Accumulate the shared modules' joined uses, then forget this batch's uses and leaves."""
        for name, pairs in self.pending.items():
            inputs = _join_uses([pair[0].to(torch.float32) for pair in pairs])
            grads = _join_uses([pair[1].to(torch.float32) for pair in pairs])
            self._accumulate(name, inputs, grads)
        self.pending.clear()
        self.uses.clear()
        self.leaves.clear()


def _frozen_state(model: nn.Module) -> tuple[bool, dict[str, bool]]:
    return model.training, {name: param.requires_grad for name, param in model.named_parameters()}


def checked_loss(loss: torch.Tensor, batch_index: int) -> torch.Tensor:
    """`loss`, after checking it is finite and depends on something that needs a gradient."""
    if not torch.isfinite(loss):
        raise ValueError(
            f"The calibration loss is {loss.item()} on batch {batch_index}: check the labels and inputs, and estimate "
            "in float32."
        )
    if not loss.requires_grad:
        raise ValueError("The calibration loss does not depend on any targeted module; nothing to weigh.")
    return loss


def _run_batches(
    model: nn.Module,
    batches: Iterable[Any],
    hooks: _Hooks,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    info: ProcessInfo,
    show_progress: bool,
) -> None:
    device = input_device(model)
    shard = shard_batches(batches, info)
    total = len(shard) if hasattr(shard, "__len__") else None
    description = "Fisher" if hooks.backward_stats else "Activations"
    for batch in tqdm(
        shard, total=total, desc=description, unit="batch", disable=not (show_progress and info.is_main)
    ):
        batch = _move(batch, device)
        hooks.mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if hooks.backward_stats:
            with torch.enable_grad():
                loss = checked_loss(loss_fn(model, batch), hooks.samples // max(_batch_size(batch), 1))
                if hooks.leaves:
                    torch.autograd.grad(loss, hooks.leaves, allow_unused=True)
                else:  # the inputs already carry gradients (e.g. `inputs_embeds` that require grad)
                    loss.backward()
            hooks.end_batch()
        else:
            with torch.no_grad():
                if isinstance(batch, dict):
                    model(**{key: value for key, value in batch.items() if key != "labels"})
                else:
                    model(batch)
        hooks.samples += _batch_size(batch)


def _reduce(
    hooks: _Hooks, modules: dict[str, nn.Module], statistics: dict[str, Statistic], info: ProcessInfo, failed: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int], set[str], int, int]:
    """Sums, token counts, modules some process saw a gradient for, examples and failures, added over processes."""
    shapes = {name: tuple(dense_weight(module).shape) for name, module in modules.items()}
    names = list(modules)
    counts = torch.tensor(
        [hooks.samples, int(failed)]
        + [hooks.tokens.get(name, 0) for name in names]
        + [int(name in hooks.graded) for name in names]
    )
    if info.is_distributed:
        counts = all_reduce_sum(counts, info)
    counts = counts.tolist()
    samples, failures = counts[0], counts[1]
    tokens = dict(zip(names, counts[2 : 2 + len(names)], strict=True))
    graded = {name for name, seen in zip(names, counts[2 + len(names) :], strict=True) if seen}
    sums: dict[str, dict[str, torch.Tensor]] = {}
    for key, stat in statistics.items():
        table = {}
        for name in names:
            value = hooks.sums[key].get(name)
            if value is None:
                value = torch.zeros(stat.shape(*shapes[name]))
            value = value.to(torch.float32).cpu()
            table[name] = all_reduce_sum(value, info) if info.is_distributed else value
        sums[key] = table
    return sums, tokens, graded, samples, failures


def collect(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module] | list[str],
    statistics: Iterable[str],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
    fisher_estimator: str = "empirical",
) -> Statistics:
    """Collect the named statistics of `modules` in one pass over calibration `batches` (see the module docstring).

    Args:
        model (`nn.Module`): The model; for backward statistics `loss_fn(model, batch)` must return a scalar loss.
        batches (`Iterable`): Calibration batches (dicts of tensors for transformers models), identical on every
            process of a distributed run.
        modules (`dict[str, nn.Module]` or `list[str]`): Target linear layers, or their names in `model`.
        statistics (`Iterable[str]`): Registered statistic names (see `hf_fwsvd.statistics.available_statistics`).
        loss_fn (`Callable`, *optional*): Loss of one batch; defaults to the model's own `outputs.loss`.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm progress bar over batches (main process only).
        fisher_estimator (`str`, *optional*, defaults to `"empirical"`): How backward statistics estimate the Fisher:
            `"empirical"` (squared per-example gradients), `"batch"` (squared batch gradients) or `"true"` (labels
            drawn from the model by `sampled_label_loss`, seeded; cannot be combined with a custom `loss_fn`).

    Returns:
        [`Statistics`]: statistic name -> module name -> fp32 CPU tensor, each divided by the number of examples (or
        of real tokens), the same on every process; `samples` and `tokens` attributes hold the counts.

    Raises:
        `ValueError`: For a non-linear target, no batch, a non-finite loss, or a module no gradient (or token) reached.
    """
    loss_fn = resolve_loss(loss_fn, fisher_estimator)
    if not isinstance(modules, dict):
        modules = {name: model.get_submodule(name) for name in modules}
    wanted, hooks = prepare_hooks(modules, statistics, fisher_estimator)
    if hooks is None:
        return Statistics()
    info = process_info()
    was_training, requires_grad = _frozen_state(model)
    model.eval()
    if hooks.backward_stats:
        for param in model.parameters():
            param.requires_grad_(False)
    hooks.attach()
    error: Exception | None = None
    try:
        _run_batches(model, batches, hooks, loss_fn, info, show_progress)
    except Exception as exc:
        if not info.is_distributed:
            raise
        error = exc  # take part in the collectives anyway, so the other processes fail instead of hanging
    finally:
        hooks.detach()
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
        model.train(was_training)
    return finish(hooks, modules, wanted, info, error)


def prepare_hooks(
    modules: dict[str, nn.Module], statistics: Iterable[str], fisher_estimator: str
) -> tuple[dict[str, Statistic], _Hooks | None]:
    """Check the targets and the calling context, and build the (detached) hooks for `statistics`.

    Shared by [`collect`] and the block-wise pass (`hf_fwsvd.statistics.blockwise`), so both start the same way.

    Returns:
        `tuple`: The wanted statistics by name, and their hooks (`None` when no statistic was asked for).
    """
    for name, module in modules.items():
        if not is_supported_linear(module):
            raise ValueError(f"`{name}` is a {type(module).__name__}, not a linear layer; cannot collect statistics.")
    wanted = {key: get_statistic(key) for key in dict.fromkeys(statistics)}
    if not wanted:
        return wanted, None
    hooks = _Hooks(modules, wanted, fisher_estimator)
    if hooks.backward_stats and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Fisher importances need gradients, but this runs inside `torch.inference_mode()`, where none can be "
            "computed. Call compress (or compute_importances) outside the inference_mode block."
        )
    return wanted, hooks


def finish(
    hooks: _Hooks,
    modules: dict[str, nn.Module],
    wanted: dict[str, Statistic],
    info: ProcessInfo,
    error: Exception | None = None,
) -> Statistics:
    """Add the sums over processes, check every module was reached and divide by the examples (or real tokens).

    Shared by [`collect`] and the block-wise pass (`hf_fwsvd.statistics.blockwise`), so both end the same way.
    """
    sums, tokens, graded, samples, failures = _reduce(hooks, modules, wanted, info, failed=error is not None)
    if error is not None:
        raise error
    if failures:
        raise RuntimeError(f"Calibration failed on {failures} other process(es); see their error messages.")
    if samples == 0:
        raise ValueError("The calibration data produced no batches: FWSVD needs at least one calibration example.")
    if hooks.backward_stats:
        missing = [name for name in modules if name not in graded]
        if missing:
            raise ValueError(
                f"No gradient reached {len(missing)} targeted module(s), e.g. `{missing[0]}`: they do not affect the "
                "task loss on this data. Exclude them with `modules_to_not_convert` or use `method='svd'`."
            )
    if hooks.forward_stats:
        missing = [name for name in modules if not tokens.get(name)]
        if missing:
            raise ValueError(
                f"No calibration token reached {len(missing)} targeted module(s), e.g. `{missing[0]}`. Check the "
                "calibration data or exclude them with `modules_to_not_convert`."
            )
    result = Statistics()
    for key, stat in wanted.items():
        if stat.per == "token":
            result[key] = {name: sums[key][name] / tokens[name] for name in modules}
        else:
            result[key] = {name: sums[key][name] / samples for name in modules}
    result.samples = samples
    result.tokens = tokens
    return result
