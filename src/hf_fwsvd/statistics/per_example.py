"""Per-example squared weight gradients of a linear layer, formed with batched matmuls (no per-example loop).

The weight gradient of example ``n`` is ``G_n^T X_n`` (``out x in``), where ``X_n`` (``tokens x in``) is its layer
input and ``G_n`` (``tokens x out``) the gradient at the layer output. The row and element-wise Fisher statistics need
the squares of these, summed over examples.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK_ELEMENTS", "per_example_squared_gradients", "per_example_squared_sums"]

# Bound (in float32 elements, 4M = 16 MiB) on the per-chunk intermediate of `per_example_squared_sums`.
CHUNK_ELEMENTS = 1 << 22


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
