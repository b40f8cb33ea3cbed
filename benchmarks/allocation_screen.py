"""Screen allocation variants the library does not offer, on the causal-LM benchmark (issue #16).

The global allocation (`hf_fwsvd.allocation`) scores direction ``k`` of module ``m`` as
``mass_m ** power * s_mk / sum_j s_mj``: the squared singular values ``s`` of the method's weighted matrix, rescaled to
the module's Fisher mass (`hf_fwsvd.pipeline.fisher_mass`). `FWSVDConfig` keeps ``allocation_power`` in [0, 1]. This
script runs `benchmarks.causal_lm` with one of two changes, for a setting that uses ``+alloc1``:

* ``--power P``: the mass raised to ``P`` (any positive value) instead of 1;
* ``--scores raw``: no rescaling, ``s_mk`` as they are (for ``fisher_whiten`` the gradient-weighted output error of
  the direction, already a loss proxy); ``--scores raw_per_out``: the same divided by ``out_features`` (the loss
  proxy if the output gradient were isotropic).

Each row's setting carries the variant, e.g. ``"fisher_whiten+alloc1+mix [power 1.5]"``. Everything else
(calibration, evaluation, CSV) is `benchmarks.causal_lm`'s; the remaining arguments go to it, e.g.
``PYTHONPATH=src:. python benchmarks/allocation_screen.py --power 1.5 -- --csv /tmp/screen.csv --skip-references
--stats-cache /tmp/h16-calib-stats --runs fisher_whiten+alloc1+update+mix@0.8``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import hf_fwsvd.pipeline as pipeline
from hf_fwsvd.allocation import direction_scores

SCORES = ("mass", "raw", "raw_per_out")


@contextlib.contextmanager
def allocation_variant(power: float = 1.0, scores: str = "mass") -> Iterator[None]:
    """Inside the block, `compress`'s global allocation uses ``mass ** power`` (with ``allocation_power=1``) or the
    raw scores (see the module docstring); restored on exit.

    Args:
        power (`float`, *optional*, defaults to 1.0): Exponent on the Fisher mass.
        scores (`str`, *optional*, defaults to `"mass"`): `"mass"`, `"raw"` or `"raw_per_out"`.
    """
    if scores not in SCORES:
        raise ValueError(f"`scores` must be one of {SCORES}, got {scores!r}.")
    if not power > 0:
        raise ValueError(f"`power` must be positive, got {power}.")
    saved_mass, saved_scores = pipeline.fisher_mass, pipeline.direction_scores

    def mass(weight, importance) -> float:
        return saved_mass(weight, importance) ** power

    def unscaled(weighted_matrix, module_mass=None):
        values = direction_scores(weighted_matrix, None)
        return values / weighted_matrix.shape[0] if scores == "raw_per_out" else values

    pipeline.fisher_mass = mass
    if scores != "mass":
        pipeline.direction_scores = unscaled
    try:
        yield
    finally:
        pipeline.fisher_mass, pipeline.direction_scores = saved_mass, saved_scores


def variant_note(power: float = 1.0, scores: str = "mass") -> str:
    """The name the variant's rows carry after their setting (`benchmarks.causal_lm.main_under`), e.g.
    ``"power 0.75"``; empty for the library's own allocation (power 1, mass scores)."""
    parts = ([f"power {power:g}"] if power != 1.0 else []) + ([f"scores {scores}"] if scores != "mass" else [])
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--power", type=float, default=1.0, help="exponent on the Fisher mass (with +alloc1)")
    parser.add_argument("--scores", choices=SCORES, default="mass")
    from benchmarks.causal_lm import main_under

    main_under(
        parser,
        lambda args: allocation_variant(args.power, args.scores),
        argv,
        note=lambda args: variant_note(args.power, args.scores),
    )


if __name__ == "__main__":
    main()
