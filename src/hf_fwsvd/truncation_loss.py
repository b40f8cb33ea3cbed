"""SVD-LLM V2's heterogeneous compression ratios from the theoretical truncation loss (Wang et al., NAACL 2025).

With whitening (``C = E[x x^T]`` over the calibration tokens), the output error that truncating module ``m`` to rank
``r`` causes on the calibration data is exactly ``L_m(r) = n * sum_{k > r} sigma_k^2``, the discarded squared singular
values of ``W_m C_m^{1/2}`` times the number of tokens ``n`` (the "theoretical truncation loss"). SVD-LLM V2 computes
it for every matrix at the uniform target ratio, groups the matrices of the same type (``q_proj`` of every layer, ...)
and gives each matrix of a group a removal ratio inversely proportional to the logarithm of its loss, scaled so that
the group's mean removal ratio is the target's: matrices that would lose more keep more.

The authors' code for V2 is not public (their repository lists it as to do), so this follows the paper's description;
where it is silent we chose, and say so: the removal ratio is the fraction of the module's weights removed, ``log``
is taken of ``max(L, e)`` (so that it is at least 1), and each removal ratio is clipped to ``[0, MAX_REMOVAL]``.

V2's second idea, "loss-optimised truncation with two SVDs instead of Cholesky" (SVD of ``C = U_c S_c U_c^T``, then
SVD of ``W U_c S_c^{1/2}``), truncates to the same approximation as our `whiten`: ``W U_c S_c^{1/2}`` and
``W C^{1/2}`` differ by an orthogonal factor on the right, so they share their left singular vectors ``U_r``, and both
keep ``U_r U_r^T W`` (tested in ``tests/test_truncation_loss.py``). Our `factorize` already never inverts ``C``. The
route itself is `method="whiten_v2"` (`hf_fwsvd.two_svd`), for side-by-side comparisons.
"""

from __future__ import annotations

import math
import re

import torch

__all__ = ["MAX_REMOVAL", "group_of", "heterogeneous_ranks", "truncation_losses"]

MAX_REMOVAL = 0.95


def group_of(name: str) -> str:
    """The matrix type of a module name: its name with every layer index removed (``model.layers.3.mlp.up_proj`` ->
    ``model.layers.*.mlp.up_proj``)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def truncation_losses(singular_values: torch.Tensor, rank: int, tokens: int) -> float:
    """``tokens * sum_{k > rank} sigma_k^2`` for the singular values of ``W C^{1/2}`` (``C`` a per-token mean)."""
    values = singular_values.detach().to(torch.float64)
    return float(tokens * values[rank:].square().sum())


def heterogeneous_ranks(
    shapes: dict[str, tuple[int, int]],
    singular_values: dict[str, torch.Tensor],
    kept_fraction: float,
    tokens: int,
) -> dict[str, int]:
    """Per-module ranks with SVD-LLM V2's allocation at `kept_fraction` of each group's weights (on average).

    Args:
        shapes (`dict[str, tuple[int, int]]`): Module name -> ``(out_features, in_features)``.
        singular_values (`dict[str, torch.Tensor]`): Module name -> singular values of ``W C^{1/2}``, where ``C`` is
            the per-token mean second moment of the module's calibration inputs.
        kept_fraction (`float`): Target fraction of the weights kept, in (0, 1).
        tokens (`int`): Calibration tokens behind ``C`` (scales the losses to sums over the calibration set).

    Returns:
        `dict[str, int]`: Module name -> rank (at least 1).
    """
    if not 0 < kept_fraction < 1:
        raise ValueError(f"`kept_fraction` must be in (0, 1), got {kept_fraction}.")
    target_removal = 1 - kept_fraction
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(group_of(name), []).append(name)
    ranks: dict[str, int] = {}
    for members in groups.values():
        inverse_logs = {}
        for name in members:
            out_features, in_features = shapes[name]
            uniform_rank = max(1, int(kept_fraction * out_features * in_features / (out_features + in_features)))
            loss = truncation_losses(singular_values[name], uniform_rank, tokens)
            inverse_logs[name] = 1 / math.log(max(loss, math.e))
        total = sum(inverse_logs.values())
        for name in members:
            out_features, in_features = shapes[name]
            removal = min(MAX_REMOVAL, max(0.0, len(members) * target_removal * inverse_logs[name] / total))
            rank = int((1 - removal) * out_features * in_features / (out_features + in_features))
            ranks[name] = max(1, min(rank, min(out_features, in_features) - 1))
    return ranks
