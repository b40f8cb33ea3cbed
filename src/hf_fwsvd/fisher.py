"""Empirical Fisher importances, reduced to one value per input feature of each targeted linear layer.

For a linear layer ``y = x W^T + b`` the gradient of a loss ``L`` w.r.t. ``W`` is ``g^T x`` with ``g = dL/dy``.
We read ``x`` with a forward hook and ``g`` with a hook on the layer's output, form each example's weight gradient,
square it, sum it over output features (the paper's row sum in its ``in x out`` layout) and add it to an fp32 vector
of length ``in_features``. No parameter ever gets a ``.grad``: all parameters are frozen during estimation and
gradients flow only through activations, so the persistent extra memory is the sum of the ``in_features`` of the
targets; the transient extra memory is each targeted layer's input, held until its gradient arrives, plus one bounded
chunk of per-example products (see `per_example_squared_sums`).

The importance of input feature ``i`` of a layer is ``F_i = 1/N sum_n sum_o (dL_n/dW_oi)^2`` over the ``N``
calibration examples, where ``L_n`` is example ``n``'s loss. The per-example gradients are recovered from the gradient
of the batch-mean loss by scaling with the batch size, which is exact when the model's loss is a mean over examples
(classification, regression) and a close approximation when it is a mean over tokens (causal LM).

Two optional extras (see [`estimate_fisher_statistics`]), collected by the same hooks:

- ``elementwise=True`` (for `method="tfwsvd"`): the full per-element Fisher ``I_oi = 1/N sum_n (dL_n/dW_oi)^2``, one
  fp32 ``out x in`` matrix per module: a second copy of the targeted parameters in memory.
- ``second_moment=True`` (for `method="fisher_whiten"`): the gradient-weighted activation second moment
  ``C = 1/N sum_n sum_t |g_nt|^2 x_nt x_nt^T`` (``in x in`` per module, with the same batch-size scaling), whose
  diagonal is the per-token version of the row Fisher above.

Three estimators of the Fisher (``estimator=``, `FWSVDConfig.fisher_estimator`), for the row and element-wise Fisher:

- ``"empirical"`` (default): squared per-example gradients of the loss on the given labels, as above.
- ``"batch"``: squared gradients of each *batch*-mean loss, ``1/N sum_b B_b (sum_o (dL_b/dW_oi)^2)`` (the mean over
  batches for equal batch sizes): what common FWSVD code computes by squaring ``param.grad`` after each batch. It
  depends on the batch size: the per-example terms' cross products only partly cancel.
- ``"true"``: the Fisher information itself, ``E_x E_{y ~ p(y|x)} (dL/dW)^2``: like ``"empirical"`` but every label
  is drawn from the model's own predictive distribution (one draw per example, or per token for token-level
  logits; ``y ~ N(f(x), 1)`` for a one-output regression head), so calibration labels are not used.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import ProcessInfo, all_reduce_sum, process_info, shard_batches
from .layers import dense_weight, is_supported_linear

__all__ = [
    "FISHER_ESTIMATORS",
    "FisherStatistics",
    "estimate_fisher",
    "estimate_fisher_statistics",
    "model_loss",
    "per_example_squared_gradients",
    "per_example_squared_sums",
    "sampled_label_loss",
]

logger = logging.getLogger(__name__)

# Bound (in float32 elements, 4M = 16 MiB) on the per-chunk intermediate of `per_example_squared_sums`.
CHUNK_ELEMENTS = 1 << 22
FISHER_ESTIMATORS = ("empirical", "true", "batch")


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
            noise = torch.randn(detached.shape, generator=generator).to(detached.device)
            target = detached + noise
        else:
            probs = detached.reshape(-1, detached.shape[-1]).softmax(-1).cpu()
            target = torch.multinomial(probs, 1, generator=generator).reshape(detached.shape[:-1]).to(logits.device)
            mask = inputs.get("attention_mask")
            if logits.ndim == 3 and torch.is_tensor(mask) and tuple(mask.shape) == tuple(target.shape):
                target = target.masked_fill(mask.to(target.device) == 0, -100)
    if regression:
        return nn.functional.mse_loss(logits.float(), target)
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
    return batch


@dataclass
class FisherStatistics:
    """What one Fisher pass collected; every tensor is fp32 on CPU, keyed by module name.

    Args:
        importance (`dict[str, torch.Tensor]`): Row Fisher, one value per input feature (always present).
        elementwise (`dict[str, torch.Tensor]`): Per-element Fisher ``out x in`` (only when requested).
        second_moment (`dict[str, torch.Tensor]`): Gradient-weighted activation second moment ``in x in`` (only
            when requested).
    """

    importance: dict[str, torch.Tensor]
    elementwise: dict[str, torch.Tensor] = field(default_factory=dict)
    second_moment: dict[str, torch.Tensor] = field(default_factory=dict)


def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in sums:
        sums[name] += value
    else:
        sums[name] = value


class _FisherHooks:
    """Forward/backward hooks that accumulate per-input-feature squared-gradient sums for a set of modules."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        elementwise: bool = False,
        second_moment: bool = False,
        estimator: str = "empirical",
    ) -> None:
        self.modules = modules
        self.estimator = estimator
        self.elementwise = elementwise
        self.second_moment = second_moment
        self.sums: dict[str, torch.Tensor] = {}
        self.element_sums: dict[str, torch.Tensor] = {}
        self.moment_sums: dict[str, torch.Tensor] = {}
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
                # The layer input is held only until its gradient arrives, then released, so activations are freed
                # during the backward pass as autograd frees its own saved tensors (not at the end of it).
                held = [args[0]]
                output.register_hook(lambda grad: self._accumulate(name, held.pop(), grad) if held else None)

        return hook

    def _accumulate(self, name: str, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            inputs = hidden.detach().to(torch.float32)
            grads = grad.detach().to(torch.float32)
            batch = inputs.shape[0] if inputs.ndim >= 2 else 1
            rows_in = inputs.reshape(-1, inputs.shape[-1])
            rows_grad = grads.reshape(-1, grads.shape[-1])
            if self.estimator == "batch":
                # the batch-mean loss's own weight gradient, squared; times B so that dividing by the number of
                # examples gives the mean over (equal-sized) batches
                squared = (rows_grad.T @ rows_in).square_()
                _add(self.sums, name, squared.sum(0) * batch)
                if self.elementwise:
                    _add(self.element_sums, name, squared * batch)
            elif inputs.ndim <= 2:
                # one example per row: (dL_n/dW)_oi = B g_no x_ni, so sum_o (.)^2 = B^2 |g_n|^2 x_ni^2
                total = (rows_grad.square().sum(-1)) @ rows_in.square()
                if self.elementwise:
                    _add(self.element_sums, name, rows_grad.square().T @ rows_in.square() * (batch * batch))
            else:
                examples_in = inputs.reshape(batch, -1, inputs.shape[-1])
                examples_grad = grads.reshape(batch, -1, grads.shape[-1])
                if self.elementwise:
                    squared = per_example_squared_gradients(examples_in, examples_grad)
                    total = squared.sum(0)
                    _add(self.element_sums, name, squared * (batch * batch))
                else:
                    total = per_example_squared_sums(examples_in, examples_grad)
            if self.estimator != "batch":
                _add(self.sums, name, total * (batch * batch))
            if self.second_moment:
                weighted = rows_in * rows_grad.norm(dim=-1, keepdim=True)
                _add(self.moment_sums, name, weighted.T @ weighted * (batch * batch))


def per_example_squared_sums(
    inputs: torch.Tensor, grads: torch.Tensor, method: str = "auto", chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """``sum_n sum_o ((G_n^T X_n)_oi)^2`` for every input feature ``i``, without a per-example Python loop.

    ``G_n^T X_n`` is example ``n``'s weight gradient (``out x in``) when ``X_n`` (``tokens x in``) is its layer input
    and ``G_n`` (``tokens x out``) the gradient at the layer output. Examples are processed in chunks with batched
    matmuls. Two exact, equivalent forms; ``"auto"`` picks the one with fewer FLOPs per example:

    - ``"direct"``: form the ``out x in`` gradients and square them (``tokens * out * in`` multiply-adds);
    - ``"gram"``: ``sum_o (G^T X)_oi^2 = sum_ts (G G^T)_ts X_ti X_si``, i.e. the diagonal of ``X^T (G G^T) X``
      (``tokens^2 * (out + in)``), cheaper whenever ``tokens * (out + in) < out * in``.

    Args:
        inputs (`torch.Tensor`): ``examples x tokens x in`` (float32).
        grads (`torch.Tensor`): ``examples x tokens x out`` (float32).
        method (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"direct"` or `"gram"`.
        chunk_elements (`int`, *optional*): Bound on the floats of the per-chunk intermediate (``chunk * out * in``
            or ``chunk * tokens * (tokens + in)``); at least one example is processed at a time.

    Returns:
        `torch.Tensor`: float32 vector of length ``in``.
    """
    examples, tokens, in_features = inputs.shape
    out_features = grads.shape[-1]
    if method == "auto":
        method = "gram" if tokens * (out_features + in_features) < out_features * in_features else "direct"
    if method not in ("direct", "gram"):
        raise ValueError(f"Unknown method {method!r}; choose 'auto', 'direct' or 'gram'.")
    per_example = out_features * in_features if method == "direct" else tokens * (tokens + in_features)
    chunk = max(1, chunk_elements // max(per_example, 1))
    total = torch.zeros(in_features, dtype=torch.float32, device=inputs.device)
    for start in range(0, examples, chunk):
        x = inputs[start : start + chunk]
        g = grads[start : start + chunk]
        if method == "direct":
            total += torch.bmm(g.transpose(1, 2), x).square_().sum((0, 1))
        else:
            kernel_x = torch.bmm(torch.bmm(g, g.transpose(1, 2)), x)
            total += (kernel_x.mul_(x)).sum((0, 1))
    return total


def per_example_squared_gradients(
    inputs: torch.Tensor, grads: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """``sum_n (G_n^T X_n)^2`` element-wise (``out x in``): the squared per-example weight gradients, summed, formed
    with batched matmuls over chunks of examples (see [`per_example_squared_sums`] for the shapes)."""
    out_features, in_features = grads.shape[-1], inputs.shape[-1]
    chunk = max(1, chunk_elements // max(out_features * in_features, 1))
    total = torch.zeros(out_features, in_features, dtype=torch.float32, device=inputs.device)
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start : start + chunk]
        g = grads[start : start + chunk]
        total += torch.bmm(g.transpose(1, 2), x).square_().sum(0)
    return total


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
    estimator: str = "empirical",
) -> dict[str, torch.Tensor]:
    """Estimate per-input-feature Fisher importances of `modules` on calibration `batches`.

    Same arguments as [`estimate_fisher_statistics`] without the extras; returns its `importance` dict.
    """
    return estimate_fisher_statistics(model, batches, modules, loss_fn, show_progress, estimator=estimator).importance


def estimate_fisher_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module] | list[str],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = model_loss,
    show_progress: bool = True,
    elementwise: bool = False,
    second_moment: bool = False,
    estimator: str = "empirical",
) -> FisherStatistics:
    """Estimate the Fisher statistics of `modules` on calibration `batches`.

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
        elementwise (`bool`, *optional*, defaults to `False`): Also collect the per-element Fisher (``out x in`` per
            module: as much memory as the targeted weights).
        second_moment (`bool`, *optional*, defaults to `False`): Also collect the gradient-weighted activation
            second moment (``in x in`` per module).
        estimator (`str`, *optional*, defaults to `"empirical"`): `"empirical"` (squared per-example gradients),
            `"batch"` (squared batch gradients) or `"true"` (labels drawn from the model, see `sampled_label_loss`;
            needs the default `loss_fn`). See the module docstring.

    Returns:
        [`FisherStatistics`]: `importance` maps module name -> fp32 vector of length ``in_features`` (on CPU).
    """
    if estimator not in FISHER_ESTIMATORS:
        raise ValueError(f"Unknown Fisher estimator {estimator!r}; choose one of {', '.join(FISHER_ESTIMATORS)}.")
    if estimator == "true":
        if loss_fn is not model_loss:
            raise ValueError(
                "estimator='true' draws the labels from the model and computes its own loss; it cannot be combined "
                "with a custom `loss_fn`. Use the default loss, or estimator='empirical'."
            )
        loss_fn = functools.partial(sampled_label_loss, generator=torch.Generator().manual_seed(0))
    if not isinstance(modules, dict):
        modules = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        if not is_supported_linear(module):
            raise ValueError(f"`{name}` is a {type(module).__name__}, not a linear layer; cannot estimate its Fisher.")
    device = _input_device(model)
    info = process_info()
    was_training, requires_grad = _frozen_state(model)
    hooks = _FisherHooks(modules, elementwise=elementwise, second_moment=second_moment, estimator=estimator)
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
    return FisherStatistics(
        {name: sums[name] / samples for name in modules},
        _extra_means(hooks.element_sums, modules, elementwise, samples, info, square=False),
        _extra_means(hooks.moment_sums, modules, second_moment, samples, info, square=True),
    )


def _extra_means(
    table: dict[str, torch.Tensor],
    modules: dict[str, nn.Module],
    enabled: bool,
    samples: int,
    info: ProcessInfo,
    square: bool,
) -> dict[str, torch.Tensor]:
    """Means of the optional element-wise (``out x in``) or second-moment (``in x in``) sums, summed over processes."""
    if not enabled:
        return {}
    means = {}
    for name, module in modules.items():
        out_features, in_features = dense_weight(module).shape
        shape = (in_features, in_features) if square else (out_features, in_features)
        value = table.get(name, torch.zeros(shape)).to(torch.float32).cpu()
        if info.is_distributed:
            value = all_reduce_sum(value, info)
        means[name] = value / samples
    return means
