"""`benchmarks/token_weight_spread.py`: Kish's effective sample size against brute force."""

import pytest
import torch

from benchmarks.token_weight_spread import effective_fraction, module_kind


def test_equal_weights_count_every_token():
    assert effective_fraction(torch.full((4, 8), 3.0)) == pytest.approx(1.0)


def test_one_token_carries_everything():
    weights = torch.zeros(10)
    weights[7] = 5.0
    assert effective_fraction(weights) == pytest.approx(0.1)


def test_matches_the_definition_on_random_weights():
    weights = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)) ** 4
    flat = weights.flatten().tolist()
    brute = sum(flat) ** 2 / (len(flat) * sum(w * w for w in flat))
    assert effective_fraction(weights) == pytest.approx(brute, rel=1e-12)


def test_all_zero_weights_give_zero():
    assert effective_fraction(torch.zeros(5)) == 0.0


def test_negative_weights_are_refused():
    with pytest.raises(ValueError, match="effective_fraction needs nonnegative weights."):
        effective_fraction(torch.tensor([1.0, -0.5]))


def test_module_kind_is_the_last_name_part():
    assert module_kind("model.layers.3.mlp.down_proj") == "down_proj"
