"""tfwsvd's cost: one ALS half-step (`hf_fwsvd.refine._solve_rows`) against the previous implementation, side by side.

A half-step solves one ``r x r`` weighted least-squares system per row of the weight. The shipped code builds every
row's Gram as one matrix product per row of the basis (upper triangle only) and solves by batched Cholesky; the
previous code built the full Grams with a batched matrix product of the scaled basis and solved by LU. Shapes: the
feed-forward layers of all-mpnet-base-v2 (3072 x 768, both half-steps) at the ranks of rank ratios 0.2, 0.33 and
0.5, with random weights and a random positive element-wise importance (the cost does not depend on the values).
Both variants' rows agree to float32 rounding; the largest relative difference is printed.

Run: ``PYTHONPATH=src:. python benchmarks/refine_speed.py --threads 1``
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side
from hf_fwsvd.refine import _CHUNK_ELEMENTS, _solve_rows

SHAPE = (3072, 768)  # all-mpnet-base-v2's intermediate.dense (out x in)
RANKS = {0.2: 154, 0.33: 253, 0.5: 384}


def previous_solve_rows(
    target: torch.Tensor, weights: torch.Tensor, right: torch.Tensor, ridge: float
) -> torch.Tensor:
    """The previous implementation: full Grams by a batched product of the scaled basis, then LU solves."""
    rows, inner = target.shape
    rank = right.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(rank * max(inner, rank), 1))
    identity = torch.eye(rank, dtype=torch.float64)
    solved = []
    for start in range(0, rows, chunk):
        w = weights[start : start + chunk]
        scaled = right.unsqueeze(0) * w.unsqueeze(1)
        gram = (scaled @ right.T).to(torch.float64)
        rhs = (scaled @ target[start : start + chunk].unsqueeze(-1)).to(torch.float64)
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]
        solved.append(torch.linalg.solve(gram + ridge * scale * identity, rhs).squeeze(-1).to(target.dtype))
    return torch.cat(solved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*SHAPE, generator=generator)
    importance = torch.rand(*SHAPE, generator=generator) + 1e-3
    rows = []
    for ratio, rank in RANKS.items():
        down = torch.randn(rank, SHAPE[1], generator=generator)
        up = torch.randn(SHAPE[0], rank, generator=generator)
        steps = {
            "A (rows of up)": (weight, importance, down),
            "B (columns of down)": (weight.T.contiguous(), importance.T.contiguous(), up.T.contiguous()),
        }
        for step, problem in steps.items():
            timings = time_side_by_side(
                {
                    "previous": lambda problem=problem: previous_solve_rows(*problem, 1e-7),
                    "shipped": lambda problem=problem: _solve_rows(*problem, 1e-7),
                },
                repeats=args.repeats,
                warmup=0,
            )
            shipped, previous = _solve_rows(*problem, 1e-7), previous_solve_rows(*problem, 1e-7)
            difference = float((shipped - previous).abs().max() / previous.abs().max())
            rows.append(
                [
                    ratio,
                    rank,
                    step,
                    f"{timings['previous']:.2f}",
                    f"{timings['shipped']:.2f}",
                    f"{timings.speedup('previous', 'shipped'):.2f}x",
                    f"{difference:.1e}",
                ]
            )
    print(machine_line())
    print(
        markdown_table(
            ["rank ratio", "rank", "half-step (3072 x 768)", "previous s", "shipped s", "speed-up", "max rel diff"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
