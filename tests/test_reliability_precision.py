"""Reliability: float16/bfloat16 models whose weights fit their dtype get factors that fit it too (singular values
balanced between `up` and `down`), so they compress, save and reload with finite, exact outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert
from reliability_cases import fails_with
from transformers import AutoModelForSequenceClassification

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.factorize import LowRankFactors, factorize, representable_factors

INPUT = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
QUERY = "bert.encoder.layer.0.attention.self.query"


def large_columns(dtype: torch.dtype, value: float):
    """A tiny BERT whose first query layer has two columns near the top of float16's range."""
    torch.manual_seed(0)
    model = tiny_bert().to(dtype)
    with torch.no_grad():
        weight = model.bert.encoder.layer[0].attention.self.query.weight
        weight[:, 3], weight[:, 5] = value, -0.8 * value
    return model


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_float16_large_columns_compress_save_and_reload(tmp_path, rank):
    """`down = U^T W` of these columns is about 4 x 30000 = 120000, beyond float16's 65504: without balancing the
    factors were Inf, the logits non-finite and the saved checkpoint could not be reloaded."""
    model = large_columns(torch.float16, 30000.0)
    compress(model, FWSVDConfig(rank=rank, method="svd"), show_progress=False)
    query = model.get_submodule(QUERY)
    assert torch.isfinite(query.down.weight).all() and torch.isfinite(query.up.weight).all()
    with torch.no_grad():
        logits = model.eval()(**INPUT).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", dtype=torch.float16).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**INPUT).logits, logits)


def test_balancing_keeps_the_product(tmp_path):
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float() * 20000
    factors = factorize(weight, 4)
    balanced = representable_factors(factors, torch.float16, "w")
    torch.testing.assert_close(balanced.product(), factors.product(), rtol=1e-5, atol=1e-2)
    assert balanced.down.abs().max() < 65504 and balanced.up.abs().max() < 65504
    assert factors.down.abs().max() > 65504  # it was needed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_factors_that_fit_are_left_unchanged(dtype):
    factors = factorize(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), 3)
    same = representable_factors(factors, dtype, "w")
    assert same is factors


def test_factors_that_cannot_fit_name_the_module():
    dtype = torch.float16
    limit = torch.finfo(dtype).max
    factors = LowRankFactors(down=torch.full((1, 4), limit * 4), up=torch.full((4, 1), limit * 4))
    name = "bert.encoder.layer.1.output.dense"
    peak = float(limit * 4)
    message = (
        f"The factors of `{name}` cannot be stored in {str(dtype).removeprefix('torch.')}: even with its singular "
        f"values balanced between `up` and `down` the largest entry is {peak:.3g}, above the dtype's maximum "
        f"{limit:.3g}. Compress the model in float32 (`model.float()`) or bfloat16, or exclude the module."
    )
    with fails_with(ValueError, message, entry="compress"):
        LowRankLinear.from_factors(factors, None, dtype=dtype, device=torch.device("cpu"), name=name)
