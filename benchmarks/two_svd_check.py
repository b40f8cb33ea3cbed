"""Can SVD-LLM V2's two-SVD truncation differ from our Cholesky route on a real model? (issue #16)

For every block linear of SmolLM2-135M, with the second moments of `benchmarks/causal_lm.py` (the 32 calibration
chunks of the 1990s addresses, read from ``--stats-cache``), at the rank that keeps `--ratio` of the module's weights:

- ``whiten``'s route, `hf_fwsvd.factorize.factorize` (Cholesky factor of ``C``, ``down = U_r^T W``), and
- ``whiten_v2``'s route, `hf_fwsvd.two_svd.two_svd_truncation` (SVD of ``C``, SVD of ``W U_c S_c^{1/2}``, map back).

It prints, per weighting, the largest difference of the two products (relative to the module's largest weight), the
largest calibration loss ``tr((W - W_r) C (W - W_r)^T)`` of each route above the optimum (the discarded squared
singular values of ``W C^{1/2}``, symmetric square root in float64), the smallest eigenvalue of ``C / max(diag C)``
and the seconds each route took. Rows go to ``results/two_svd_check.csv``.

Run from the repository root: ``PYTHONPATH=src:. python benchmarks/two_svd_check.py --stats-cache DIR``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fwsvd import FWSVDConfig
from hf_fwsvd.factorize import factorize
from hf_fwsvd.targets import find_target_modules
from hf_fwsvd.two_svd import two_svd_truncation

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTINGS = {"activation_second_moment": "whiten vs whiten_v2", "gradient_second_moment": "fisher_whiten's C"}


def calibration_loss(weight: torch.Tensor, approximation: torch.Tensor, moment: torch.Tensor) -> float:
    residual = weight.double() - approximation.double()
    return float(((residual @ moment) * residual).sum())


def main() -> None:
    from benchmarks.assets import smollm2_dir
    from benchmarks.causal_lm import StatisticsStore, benchmark_texts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stats-cache", type=Path, required=True)
    parser.add_argument("--ratio", type=float, default=0.8, help="fraction of each module's weights kept")
    parser.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=list(WEIGHTINGS))
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="only these decoder layers (default all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    targets = find_target_modules(dense, FWSVDConfig(method="svd", rank=1))
    if args.layers is not None:
        targets = {n: m for n, m in targets.items() if any(f".layers.{i}." in n for i in args.layers)}
    store = StatisticsStore(dense, tokenizer, targets, directory, args.stats_cache)
    stats, _ = store.get(benchmark_texts(tokenizer)["calibration"], args.weightings)
    rows = []
    for weighting in args.weightings:
        for name, module in targets.items():
            weight = module.weight.detach()
            out_features, in_features = weight.shape
            rank = int(args.ratio * out_features * in_features / (out_features + in_features))
            moment = stats[weighting][name].double()
            moment = moment / moment.diagonal().max()
            started = time.perf_counter()
            cholesky = factorize(weight, rank, moment.float()).product()
            cholesky_s = time.perf_counter() - started
            started = time.perf_counter()
            v2 = two_svd_truncation(weight, rank, moment.float()).product()
            v2_s = time.perf_counter() - started
            values, vectors = torch.linalg.eigh(moment)  # C^{1/2}, negative rounding-level eigenvalues clamped
            root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
            optimum = float(torch.linalg.svdvals(weight.double() @ root)[rank:].square().sum())
            rows.append(
                {
                    "weighting": weighting,
                    "module": name,
                    "rank": rank,
                    "max_abs_diff_rel": float((cholesky - v2).abs().max() / weight.abs().max()),
                    "fro_diff_rel": float((cholesky - v2).norm() / weight.norm()),
                    "cholesky_excess": calibration_loss(weight, cholesky, moment) / optimum - 1,
                    "v2_excess": calibration_loss(weight, v2, moment) / optimum - 1,
                    "min_eig": float(values[0]),
                    "cholesky_s": round(cholesky_s, 3),
                    "v2_s": round(v2_s, 3),
                }
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.layers is None else "_layers_" + "_".join(map(str, args.layers))
    with (RESULTS / f"two_svd_check{suffix}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"ratio {args.ratio}: {len(targets)} modules per weighting")
    print(
        "| weighting | max abs diff of products / max abs W | max rel. Frobenius diff | max excess calibration loss, "
        "Cholesky route | max excess, two SVDs | smallest eigenvalue of C / max diag | seconds, Cholesky / two SVDs |"
    )
    print("|---|---|---|---|---|---|---|")
    for weighting in args.weightings:
        mine = [row for row in rows if row["weighting"] == weighting]
        print(
            f"| {weighting} | {max(r['max_abs_diff_rel'] for r in mine):.2e} | "
            f"{max(r['fro_diff_rel'] for r in mine):.2e} | {max(r['cholesky_excess'] for r in mine):.2e} | "
            f"{max(r['v2_excess'] for r in mine):.2e} | {min(r['min_eig'] for r in mine):.2e} | "
            f"{sum(r['cholesky_s'] for r in mine):.0f} / {sum(r['v2_s'] for r in mine):.0f} |"
        )


if __name__ == "__main__":
    main()
