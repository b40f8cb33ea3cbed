"""Screen variants of `method="kfac_whiten"` on the causal-LM benchmark (issue #16).

`kfac_whiten` weighs the truncation by ``tr(G dW C dW^T)``: ``C = E[|g|^2 x x^T]`` on the input side, and on the
output side the output-gradient moment ``G`` normalised to a largest diagonal entry of one and damped by
`hf_fwsvd.kronecker.OUTPUT_DAMPING` (see `hf_fwsvd.kronecker`). The larger the damping, the closer ``G`` is to the
identity, and the closer the method is to `fisher_whiten`. This script runs `benchmarks.causal_lm` with either change:

* ``--output-damping D``: the damping of ``G``, instead of the library's 1e-6;
* ``--two-sided-allocation``: the global allocation scores each module by the two-sided spectrum (the singular values
  of ``L^T W M``, `hf_fwsvd.kronecker.kronecker_weighted_matrix`) instead of the library's one-sided ``W M``; this
  separates what the allocation and the truncation do.

Each row's setting carries the variant, e.g. ``"kfac_whiten+alloc1+mix [damping 1e-2]"``. Everything else
(calibration, evaluation, CSV) is `benchmarks.causal_lm`'s; the remaining arguments go to it, e.g.
``PYTHONPATH=src:. python benchmarks/kfac_screen.py --output-damping 0.1 -- --csv /tmp/screen.csv
--skip-references --stats-cache /tmp/h16-calib-stats --runs kfac_whiten+alloc1+mix@0.8``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import hf_fwsvd.kronecker as kronecker
from hf_fwsvd.methods.kfac_whiten import KroneckerFisherWhitening


def _two_sided_matrix(self, name: str, weight, stats, config):
    """``L^T W M`` of module `name`: the spectrum the two-sided objective drops (the allocation's scores)."""
    return kronecker.kronecker_weighted_matrix(
        weight,
        self.importance(name, stats),
        stats["output_gradient_second_moment"][name],
        floor=config.importance_floor,
        name=name,
    )


@contextlib.contextmanager
def kfac_variant(
    output_damping: float = kronecker.OUTPUT_DAMPING, two_sided_allocation: bool = False
) -> Iterator[None]:
    """Inside the block, `kfac_whiten` damps ``G`` by `output_damping` and, with `two_sided_allocation`, is allocated
    by the two-sided spectrum; restored on exit.

    Args:
        output_damping (`float`, *optional*): Damping of the normalised output-gradient moment (positive).
        two_sided_allocation (`bool`, *optional*, defaults to `False`): Score the allocation by ``L^T W M``.
    """
    if not output_damping > 0:
        raise ValueError(f"`output_damping` must be positive, got {output_damping}.")
    saved_damping = kronecker.OUTPUT_DAMPING
    overridden = "weighted_matrix" in vars(KroneckerFisherWhitening)
    saved_matrix = KroneckerFisherWhitening.weighted_matrix
    kronecker.OUTPUT_DAMPING = output_damping
    if two_sided_allocation:
        KroneckerFisherWhitening.weighted_matrix = _two_sided_matrix
    try:
        yield
    finally:
        kronecker.OUTPUT_DAMPING = saved_damping
        if overridden:
            KroneckerFisherWhitening.weighted_matrix = saved_matrix
        elif "weighted_matrix" in vars(KroneckerFisherWhitening):
            del KroneckerFisherWhitening.weighted_matrix


def variant_note(output_damping: float = kronecker.OUTPUT_DAMPING, two_sided_allocation: bool = False) -> str:
    """The name the variant's rows carry after their setting (`benchmarks.causal_lm.main_under`), e.g.
    ``"two-sided allocation, damping 1e-2"``; empty for the library's own `kfac_whiten`."""
    mantissa, exponent = f"{output_damping:e}".split("e")  # every significant digit: 0.015 is "1.5e-2", not "2e-2"
    mantissa = mantissa.rstrip("0").rstrip(".")
    parts = ["two-sided allocation"] if two_sided_allocation else []
    if output_damping != kronecker.OUTPUT_DAMPING:
        parts.append(f"damping {mantissa}e{int(exponent)}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-damping", type=float, default=kronecker.OUTPUT_DAMPING)
    parser.add_argument("--two-sided-allocation", action="store_true")
    from benchmarks.causal_lm import main_under

    main_under(
        parser,
        lambda args: kfac_variant(args.output_damping, args.two_sided_allocation),
        argv,
        note=lambda args: variant_note(args.output_damping, args.two_sided_allocation),
    )


if __name__ == "__main__":
    main()
