"""Performance and scale (issue #14): the fused finite check on reload, rank rounding, bounded-memory compression."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_fwsvd.checkpoint_checks import check_factors_finite
from hf_fwsvd.layers import LowRankLinear


def _two_factorised(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = nn.Sequential(LowRankLinear(8, 6, 2, dtype=dtype), LowRankLinear(6, 4, 3, dtype=dtype))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "minus-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_finite_check_names_the_first_bad_factor(value, dtype):
    model = _two_factorised(dtype)
    with torch.no_grad():
        model[1].up.weight[2, 1] = value
    with pytest.raises(ValueError) as info:
        check_factors_finite(model)
    assert str(info.value) == (
        "The checkpoint's `1.up.weight` holds NaN/Inf values: the weights file is corrupt or was saved from a broken "
        "model. Re-export it with `save_pretrained` from the compressed model."
    )


def test_finite_check_sees_inf_and_minus_inf_that_cancel_in_a_sum():
    model = _two_factorised()
    with torch.no_grad():
        model[0].down.weight[0, 0] = float("inf")
        model[0].down.weight[1, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"`0\.down\.weight` holds NaN/Inf"):
        check_factors_finite(model)


def test_finite_check_accepts_finite_factors_whose_sum_overflows():
    model = _two_factorised()
    with torch.no_grad():
        model[0].up.weight.fill_(torch.finfo(torch.float32).max)  # every value finite, their sum is not
    assert not torch.isfinite(model[0].up.weight.sum(dtype=torch.float32))
    check_factors_finite(model)  # no error: the exact element-wise check clears it


def test_finite_check_skips_meta_factors():
    with torch.device("meta"):
        model = nn.Sequential(LowRankLinear(8, 6, 2))
    check_factors_finite(model)
