"""SVD-LLM V2's loss-based ratios and its two-SVD truncation (`hf_fwsvd.truncation_loss`)."""

from __future__ import annotations

import pytest
import torch

from hf_fwsvd.factorize import factorize
from hf_fwsvd.truncation_loss import group_of, heterogeneous_ranks, truncation_losses


def test_group_of_strips_layer_indices():
    assert group_of("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"


@pytest.mark.parametrize("seed", range(3))
def test_two_svd_truncation_equals_our_whitening(seed):
    """V2's loss-optimised truncation (SVD of C, then of W U_c S_c^{1/2}) keeps the same approximation as `whiten`."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(9, 7, generator=generator, dtype=torch.float64)
    inputs = torch.randn(30, 7, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 7).double()
    moment = inputs.T @ inputs / 30
    rank = 3
    u_c, s_c, _ = torch.linalg.svd(moment)
    u, s, vt = torch.linalg.svd(weight @ u_c @ torch.diag(s_c.sqrt()))
    v2 = u[:, :rank] @ torch.diag(s[:rank]) @ vt[:rank] @ torch.diag(s_c.rsqrt()) @ u_c.T
    ours = factorize(weight.float(), rank, moment.float()).product().double()
    torch.testing.assert_close(ours, v2, atol=1e-4, rtol=1e-4)
    # and its output error is the theoretical truncation loss
    error = ((weight - v2) @ moment * (weight - v2)).sum()
    torch.testing.assert_close(error, torch.tensor(truncation_losses(s, rank, 1), dtype=torch.float64))


def test_heterogeneous_ranks_give_lossier_matrices_more_rank_and_keep_the_group_budget():
    shapes = {f"layers.{i}.proj": (20, 20) for i in range(3)}
    values = {
        "layers.0.proj": torch.linspace(10, 1, 20),  # flat spectrum: large truncation loss
        "layers.1.proj": torch.logspace(1, -3, 20),
        "layers.2.proj": torch.logspace(1, -6, 20),  # fast decay: small loss
    }
    ranks = heterogeneous_ranks(shapes, values, kept_fraction=0.5, tokens=1000)
    assert ranks["layers.0.proj"] > ranks["layers.1.proj"] > ranks["layers.2.proj"]
    uniform = int(0.5 * 400 / 40)
    assert abs(sum(ranks.values()) - 3 * uniform) <= 3  # the group's mean ratio is the target (up to rounding)


def test_heterogeneous_ranks_reject_a_bad_fraction():
    with pytest.raises(ValueError) as error:
        heterogeneous_ranks({}, {}, kept_fraction=1.0, tokens=1)
    assert str(error.value) == "`kept_fraction` must be in (0, 1), got 1.0."
