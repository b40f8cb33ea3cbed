"""The int8 comparison's model builders: torchao weight-only int8 of a dense model, and int8 factors of a compressed
one equal to what `FWSVDConfig(factor_dtype="int8")` builds."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_data, tiny_bert

pytest.importorskip("torchao")

from benchmarks.int8_compare import forward_seconds, weight_only_int8, with_int8_factors  # noqa: E402
from hf_fwsvd import FWSVDConfig, LowRankLinear, compress  # noqa: E402


def test_weight_only_int8_quantises_every_linear_and_keeps_the_outputs_close(sample_input):
    torch.manual_seed(0)
    dense = tiny_bert().eval()
    quantised = weight_only_int8(dense)
    linears = [m for m in quantised.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 14  # 2 layers x 6, the pooler and the classifier
    assert {type(m.weight).__name__ for m in linears} == {"Int8Tensor"}
    assert all(m.weight.qdata.dtype == torch.int8 for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in dense.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        expected, found = dense(**sample_input).logits, quantised(**sample_input).logits
    assert not torch.equal(found, expected)
    assert torch.allclose(found, expected, atol=2e-2)


def test_int8_factors_equal_the_librarys_factor_dtype(sample_input):
    torch.manual_seed(0)
    dense = tiny_bert().eval()
    data = calibration_data("bert", 12)
    low_rank = compress(copy.deepcopy(dense), FWSVDConfig(method="whiten", rank=4, calibration_dataset=data), False)
    direct = compress(
        copy.deepcopy(dense),
        FWSVDConfig(method="whiten", rank=4, calibration_dataset=data, factor_dtype="int8"),
        show_progress=False,
    )
    built = with_int8_factors(low_rank)
    assert sum(isinstance(m, LowRankLinear) for m in built.modules()) == 12
    with torch.no_grad():
        assert torch.equal(built(**sample_input).logits, direct(**sample_input).logits)
        assert not torch.equal(built(**sample_input).logits, low_rank(**sample_input).logits)


def test_forward_seconds_times_every_model(sample_input):
    torch.manual_seed(0)
    models = {"a": tiny_bert().eval(), "b": tiny_bert().eval()}
    seconds = forward_seconds(models, [sample_input, sample_input], rounds=2)
    assert seconds.keys() == {"a", "b"} and all(0 < value < 10 for value in seconds.values())
