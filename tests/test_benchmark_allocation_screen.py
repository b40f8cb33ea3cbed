"""The allocation screen's variants change exactly the allocation's scores, and are undone on exit."""

from __future__ import annotations

import pytest
import torch

import hf_fwsvd.pipeline as pipeline
from benchmarks.allocation_screen import allocation_variant


def test_power_raises_the_fisher_mass_and_is_restored_after_an_error():
    weight, importance = torch.randn(6, 4), torch.rand(4)
    mass = pipeline.fisher_mass(weight, importance)
    with pytest.raises(RuntimeError, match="boom"), allocation_variant(power=1.5):
        assert pipeline.fisher_mass(weight, importance) == pytest.approx(mass**1.5)
        raise RuntimeError("boom")
    assert pipeline.fisher_mass(weight, importance) == mass


@pytest.mark.parametrize("scores, divisor", [("raw", 1), ("raw_per_out", 6)], ids=["raw", "raw_per_out"])
def test_raw_scores_ignore_the_mass(scores, divisor):
    weighted = torch.randn(6, 4, dtype=torch.float64)
    energy = torch.linalg.svdvals(weighted.float()).double().square()
    with allocation_variant(scores=scores):
        assert torch.allclose(pipeline.direction_scores(weighted, 123.0), energy / divisor, rtol=1e-5)
    rescaled = pipeline.direction_scores(weighted, 123.0)  # restored: rescaled to the mass again
    assert float(rescaled.sum()) == pytest.approx(123.0)


def test_bad_variants_are_refused():
    with pytest.raises(ValueError, match=r"`scores` must be one of \('mass', 'raw', 'raw_per_out'\), got 'loss'"):
        with allocation_variant(scores="loss"):
            pass
    with pytest.raises(ValueError, match="`power` must be positive, got 0"):
        with allocation_variant(power=0):
            pass


def test_rows_name_the_variant_after_their_setting(monkeypatch):
    import benchmarks.allocation_screen as screen
    import benchmarks.causal_lm as causal_lm

    assert screen.variant_note() == ""
    assert screen.variant_note(power=0.75) == "power 0.75"
    assert screen.variant_note(power=1.5, scores="raw") == "power 1.5, scores raw"
    assert causal_lm.noted("kfac_whiten+alloc1+mix", "power 0.75") == "kfac_whiten+alloc1+mix [power 0.75]"
    assert causal_lm.noted("kfac_whiten+alloc1+mix", "") == "kfac_whiten+alloc1+mix"
    assert causal_lm.unnoted("kfac_whiten+alloc1+mix [power 0.75]") == ("kfac_whiten+alloc1+mix", "power 0.75")
    assert causal_lm.unnoted("kfac_whiten+alloc1+mix") == ("kfac_whiten+alloc1+mix", "")
    for note in ("power 0.75", "two-sided allocation, damping 1.5e-2", ""):
        assert causal_lm.unnoted(causal_lm.noted("whiten+mix", note)) == ("whiten+mix", note)
    seen = {}
    monkeypatch.setattr(causal_lm, "main", lambda argv, note="": seen.update(argv=argv, note=note))
    screen.main(["--power", "0.75", "--", "--runs", "kfac_whiten+alloc1+mix@0.8"])
    assert seen == {"argv": ["--runs", "kfac_whiten+alloc1+mix@0.8"], "note": "power 0.75"}
