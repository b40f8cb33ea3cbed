"""The built-in calibration statistics of a linear layer ``y = x W^T + b`` (each fp32, keyed by module name).

Backward statistics use the gradient ``g`` of the batch-mean loss at the layer output; example ``n``'s own gradient is
recovered by scaling with the batch size ``B`` (exact when the loss is a mean over examples, a close approximation for
a mean over tokens), and each is divided by the number of calibration examples ``N``:

- ``row_fisher``: ``F_i = 1/N sum_n sum_o (dL_n/dW_oi)^2``, one value per input feature (FWSVD's importance);
- ``elementwise_fisher``: ``I_oi = 1/N sum_n (dL_n/dW_oi)^2`` (``out x in``: a second copy of the weight);
- ``gradient_second_moment``: ``C = 1/N sum_n sum_t |g_nt|^2 x_nt x_nt^T`` (``in x in``);
- ``output_gradient_second_moment``: ``G = 1/N sum_n sum_t g_nt g_nt^T`` (``out x out``, the output factor of a
  Kronecker-factored Fisher);
- ``first_token_gradient_second_moment`` / ``first_token_output_gradient_second_moment``: the same two sums over each
  sequence's first real token only (its part of ``C`` and ``G``, where causal LMs' attention sinks form), so that
  `hf_fwsvd.first_token_weight` can weigh that token differently without another calibration pass.

With the ``"batch"`` Fisher estimator the two Fisher statistics square the gradient of the batch-mean loss instead,
``B_b (dL_b/dW)^2`` per batch (divided by ``N``: the mean over batches of equal size), as common FWSVD code does; the
``"true"`` estimator changes only the labels (see `hf_fwsvd.statistics.collector.sampled_label_loss`).

Forward statistics need no labels; they are divided by the number ``n`` of real (non-padding) tokens that reached the
layer, padding being dropped with the batch's `attention_mask`:

- ``activation_second_moment``: ``1/n sum x x^T`` (``in x in``, SVD-LLM whitening);
- ``activation_abs_mean``: ``1/n sum |x|`` (length ``in``, ASVD scaling);
- ``first_token_output_energy``: ``1/n [sum_n |y_n1|^2, sum_n sum_{t>1} |y_nt|^2, N_first, N_other]`` (length 4):
  the output energy of each sequence's first real token and of its other real tokens, with their counts, so that
  ``(E_first / N_first) / (E_other / N_other)`` finds attention-sink modules (`hf_fwsvd.sinks`).
"""

from __future__ import annotations

import torch

from .base import Observation, Statistic
from .per_example import per_example_squared_gradients, per_example_squared_sums
from .registry import register_statistic

__all__ = [
    "ActivationAbsMean",
    "ActivationSecondMoment",
    "ElementwiseFisher",
    "FirstTokenGradientSecondMoment",
    "FirstTokenOutputEnergy",
    "FirstTokenOutputGradientSecondMoment",
    "GradientSecondMoment",
    "OutputGradientSecondMoment",
    "RowFisher",
]


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def _batch_squared_gradient(observation: Observation) -> torch.Tensor:
    """``(dL_b/dW)^2 = (G^T X)^2`` of the batch-mean loss (``out x in``), for the ``"batch"`` estimator."""
    return observation.memo(
        "batch_squared_gradient", lambda: (_rows(observation.grads).T @ _rows(observation.inputs)).square_()
    )


def _squared_gradients(observation: Observation) -> torch.Tensor:
    """``sum_n (G_n^T X_n)^2`` over the batch's examples (``out x in``), shared by the row and element-wise Fisher."""

    def compute() -> torch.Tensor:
        inputs, grads = observation.inputs, observation.grads
        if inputs.ndim <= 2:  # one example per row: (G_n^T X_n)_oi = g_no x_ni
            return _rows(grads).square().T @ _rows(inputs).square()
        batch = observation.batch
        return per_example_squared_gradients(
            inputs.reshape(batch, -1, inputs.shape[-1]), grads.reshape(batch, -1, grads.shape[-1])
        )

    return observation.memo("squared_gradients", compute)


@register_statistic
class RowFisher(Statistic):
    name = "row_fisher"
    summary = "row Fisher: summed squared per-example weight gradients, one value per input feature"
    needs_backward = True

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (in_features,)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        inputs, grads, batch = observation.inputs, observation.grads, observation.batch
        if observation.estimator == "batch":
            return _batch_squared_gradient(observation).sum(0) * batch
        if inputs.ndim <= 2:  # sum_o (B g_no x_ni)^2 = B^2 |g_n|^2 x_ni^2
            total = _rows(grads).square().sum(-1) @ _rows(inputs).square()
        elif "elementwise_fisher" in observation.requested:
            total = _squared_gradients(observation).sum(0)
        else:
            total = per_example_squared_sums(
                inputs.reshape(batch, -1, inputs.shape[-1]), grads.reshape(batch, -1, grads.shape[-1])
            )
        return total * (batch * batch)


@register_statistic
class ElementwiseFisher(Statistic):
    name = "elementwise_fisher"
    summary = "element-wise Fisher: squared per-example weight gradients, out x in"
    needs_backward = True

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (out_features, in_features)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        if observation.estimator == "batch":
            return _batch_squared_gradient(observation) * observation.batch
        return _squared_gradients(observation) * (observation.batch * observation.batch)


@register_statistic
class GradientSecondMoment(Statistic):
    name = "gradient_second_moment"
    summary = "gradient-weighted input second moment sum_t |g_t|^2 x_t x_t^T, in x in"
    needs_backward = True

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (in_features, in_features)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        weighted = _rows(observation.inputs) * _rows(observation.grads).norm(dim=-1, keepdim=True)
        return weighted.T @ weighted * (observation.batch * observation.batch)


@register_statistic
class OutputGradientSecondMoment(Statistic):
    name = "output_gradient_second_moment"
    summary = "output-gradient second moment sum_t g_t g_t^T, out x out"
    needs_backward = True

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (out_features, out_features)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        grads = _rows(observation.grads)
        return grads.T @ grads * (observation.batch * observation.batch)


@register_statistic
class ActivationSecondMoment(Statistic):
    name = "activation_second_moment"
    summary = "input second moment x x^T over real tokens, in x in"
    per = "token"

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (in_features, in_features)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        rows = observation.real_rows()
        return rows.T @ rows


@register_statistic
class ActivationAbsMean(Statistic):
    name = "activation_abs_mean"
    summary = "mean input magnitude |x| over real tokens, one value per input feature"
    per = "token"

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (in_features,)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        return observation.real_rows().abs().sum(0)


@register_statistic
class FirstTokenOutputEnergy(Statistic):
    name = "first_token_output_energy"
    summary = (
        "output energy of each sequence's first real token and of its other tokens, with counts (attention sinks)"
    )
    per = "token"

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (4,)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        outputs = observation.outputs
        if outputs is None or outputs.ndim != 3:
            raise ValueError(
                "`first_token_output_energy` needs the layer's output as batch x tokens x features; this layer's "
                f"output has shape {None if outputs is None else tuple(outputs.shape)}. It applies to sequence models."
            )
        outputs = outputs.to(torch.float32)
        energy = (outputs.unsqueeze(-2) @ outputs.unsqueeze(-1)).reshape(outputs.shape[:2])  # batch x tokens
        real = observation.real_mask()
        if real is None:
            real = torch.ones_like(energy, dtype=torch.bool)
        first, has_tokens = _first_real_tokens(observation, energy)
        first_energy = (energy.gather(1, first.unsqueeze(1)).squeeze(1) * has_tokens).sum()
        total = (energy * real).sum()
        sequences = has_tokens.sum().to(energy.dtype)
        others = real.sum().to(energy.dtype) - sequences
        return torch.stack([first_energy, total - first_energy, sequences, others])


def _first_real_tokens(observation: Observation, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's first real token (its index on the token axis of `tensor`, ``batch x tokens x ...``; left or
    right padding) and whether the sequence has a real token at all; computed once per observation."""

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        real = observation.real_mask()
        if real is None:  # every token is real
            batch = tensor.shape[0]
            return (torch.zeros(batch, dtype=torch.long, device=tensor.device),
                    torch.ones(batch, dtype=torch.bool, device=tensor.device))  # fmt: skip
        return real.float().argmax(dim=1), real.any(dim=1)

    return observation.memo("first_real_tokens", compute)


def _first_token_rows(observation: Observation, tensor: torch.Tensor, statistic: str) -> torch.Tensor:
    """The rows of `tensor` (``batch x tokens x features``) at each sequence's first real token (``batch x
    features``; zero for a row without real tokens)."""
    if tensor.ndim != 3:
        raise ValueError(
            f"`{statistic}` needs the layer's input and output gradient as batch x tokens x features; this layer's "
            f"have shape {tuple(tensor.shape)}. It applies to sequence models."
        )
    first, has_tokens = _first_real_tokens(observation, tensor)
    rows = tensor[torch.arange(tensor.shape[0], device=tensor.device), first]
    return rows * has_tokens.unsqueeze(1).to(rows.dtype)


@register_statistic
class FirstTokenGradientSecondMoment(Statistic):
    name = "first_token_gradient_second_moment"
    summary = "the first token's part of gradient_second_moment: |g_1|^2 x_1 x_1^T per sequence, in x in"
    needs_backward = True

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (in_features, in_features)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        inputs = _first_token_rows(observation, observation.inputs, self.name)
        grads = _first_token_rows(observation, observation.grads, self.name)
        weighted = inputs * grads.norm(dim=-1, keepdim=True)
        return weighted.T @ weighted * (observation.batch * observation.batch)


@register_statistic
class FirstTokenOutputGradientSecondMoment(Statistic):
    name = "first_token_output_gradient_second_moment"
    summary = "the first token's part of output_gradient_second_moment: g_1 g_1^T per sequence, out x out"
    needs_backward = True

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (out_features, out_features)

    def accumulate(self, observation: Observation) -> torch.Tensor:
        grads = _first_token_rows(observation, observation.grads, self.name)
        return grads.T @ grads * (observation.batch * observation.batch)
