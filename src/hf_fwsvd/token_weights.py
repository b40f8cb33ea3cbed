"""Per-token weights for a Fisher-weighted least-squares fit: the squared norm of the loss gradient at a module output.

`fisher_whiten` and `kfac_whiten` weigh each calibration token's output error by ``|g_t|^2``, the squared norm of the
loss gradient at the module output for that token (their input factor is ``sum_t |g_t|^2 x_t x_t^T``). SVD-LLM's
sequential update (`hf_fwsvd.lstsq_update`) refits `up` on the compressed model's inputs, where no gradient is
known; `output_gradient_token_weights` records the dense model's ``|g_t|^2`` per module and per token, so the update
can weigh the same tokens the same way (``sequential_update(..., token_weights=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .statistics.collector import checked_loss, input_device, model_loss

__all__ = ["output_gradient_token_weights"]


def output_gradient_token_weights(
    model: nn.Module,
    names: Iterable[str],
    batches: Iterable[dict[str, Any]],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = False,
) -> dict[str, list[torch.Tensor]]:
    """``|g_t|^2`` at the output of every named module, for every token of every batch, on `model` as it is.

    The gradient is that of the batch-mean loss, scaled by the batch size (as the backward statistics of
    `hf_fwsvd.statistics` scale it), so weights of batches of different sizes are comparable. Padding tokens get
    the weight their (zero) gradient gives them.

    Args:
        model (`nn.Module`): The model whose gradients weigh the tokens (the dense model); not modified.
        names (`Iterable[str]`): Module names (each called once per forward pass).
        batches (`Iterable[dict]`): Calibration batches with what `loss_fn` needs (`labels` for the default loss);
            pass the same batches, in the same order, to `sequential_update`.
        loss_fn (`Callable`, *optional*): Loss of one batch; defaults to the model's own `outputs.loss`.
        show_progress (`bool`, *optional*, defaults to `False`): A progress bar over the batches.

    Returns:
        `dict[str, list[torch.Tensor]]`: Module name -> one float32 CPU tensor per batch, shaped like the module's
        input without its last dimension (``batch x tokens`` for a transformer).

    Raises:
        `ValueError`: When a module is called more than once in a forward pass, or the loss reaches none of them.
    """
    names = list(names)
    loss_fn = loss_fn or model_loss
    weights: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    outputs: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in outputs:
                raise ValueError(
                    f"`{name}` ran twice in one forward pass; per-token weights need each module called once."
                )
            outputs[name] = output

        return hook

    def require_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if output.requires_grad else output.detach().requires_grad_(True)

    handles = [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in names]
    handles.append(model.get_input_embeddings().register_forward_hook(require_grad))
    device = input_device(model)
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(tqdm(batches, desc="Token weights", unit="batch", disable=not show_progress)):
            batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            outputs.clear()
            with torch.enable_grad():
                loss = checked_loss(loss_fn(model, batch), index)
                missing = [name for name in names if name not in outputs]
                if missing:
                    raise ValueError(f"`{missing[0]}` did not run in the forward pass of batch {index}.")
                reached = [name for name in names if outputs[name].requires_grad]
                if not reached:
                    raise ValueError("The loss reaches none of the named modules; nothing to weigh.")
                found = torch.autograd.grad(loss, [outputs[name] for name in reached], allow_unused=True)
                grads = dict(zip(reached, found, strict=True))
            for name in names:
                output, grad = outputs[name], grads.get(name)
                size = output.shape[0] if output.ndim >= 2 else 1
                squared = torch.zeros(output.shape[:-1]) if grad is None else grad.detach().float().pow(2).sum(-1)
                weights[name].append((squared * size * size).cpu())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        outputs.clear()
    return weights
