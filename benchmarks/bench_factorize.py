"""Factorisation cost: exact SVD vs the randomized solver, and factorising layers in parallel.

1. For every compressed weight of all-MiniLM-L6-v2 (with Fisher importances from 16 Pang & Lee sentences) at rank
   ratios 0.1/0.25/0.33/0.5: time `factorize(..., svd_solver="full")` vs ``"randomized"`` side by side, and the
   relative increase of the weighted reconstruction error the randomized solver causes.
2. The same on a larger Gaussian matrix (``--sizes``, default 1024; a flat spectrum, the hard case for randomized SVD)
   to locate where the randomized solver starts to pay off; this is what ``svd_solver="auto"`` encodes.
3. All 36 MiniLM layers in sequence at 1 and 2 threads vs two worker threads of one torch thread each.

Run: ``PYTHONPATH=src:. python benchmarks/bench_factorize.py --threads 1``
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
from concurrent.futures import ThreadPoolExecutor

import torch

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side
from hf_fwsvd.factorize import choose_svd_solver, factorize, relative_errors

RATIOS = (0.1, 0.25, 0.33, 0.5)


def minilm_weights_and_importances(samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.assets import minilm_dir, polarity_splits
    from hf_fwsvd import FWSVDConfig, compute_importances
    from hf_fwsvd.targets import find_target_modules

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = FWSVDConfig(calibration_dataset=polarity_splits()["train"][:samples], tokenizer=tokenizer)
    targets = find_target_modules(model, config)
    importances = compute_importances(model, config, targets, show_progress=False)
    return {name: (module.weight.detach().clone(), importances[name]) for name, module in targets.items()}


def exact_errors(weight: torch.Tensor, importance: torch.Tensor | None, ranks: list[int]) -> dict[int, float]:
    """Weighted errors of the exact solver at several ranks."""
    errors = {}
    for rank in ranks:
        factors = factorize(weight, rank, importance, svd_solver="full")
        errors[rank] = relative_errors(weight, factors.product(), importance)["weighted"]
    return errors


def solver_rows(groups: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]], repeats: int) -> list[list]:
    rows = []
    for label, items in groups.items():
        shape = tuple(items[0][0].shape)
        ranks = {ratio: max(1, round(ratio * min(shape))) for ratio in RATIOS}

        def run(solver, rank, items=items):
            for weight, importance in items:
                factorize(weight, rank, importance, svd_solver=solver)

        # the exact solver's cost does not depend on the rank: time it once
        variants = {"full": lambda run=run, rank=ranks[RATIOS[0]]: run("full", rank)}
        variants.update({ratio: (lambda run=run, rank=rank: run("randomized", rank)) for ratio, rank in ranks.items()})
        times = time_side_by_side(variants, repeats=repeats, min_time=0)
        exact = [exact_errors(w, i, list(ranks.values())) for w, i in items]
        for ratio, rank in ranks.items():
            extra = [
                relative_errors(w, factorize(w, rank, i, svd_solver="randomized").product(), i)["weighted"]
                / errors[rank]
                - 1
                for (w, i), errors in zip(items, exact, strict=True)
            ]
            rows.append(
                [
                    label, f"{shape[0]}x{shape[1]}", len(items), ratio, rank,
                    f"{times['full'] * 1e3 / len(items):.1f}", f"{times[ratio] * 1e3 / len(items):.1f}",
                    f"{times.speedup('full', ratio):.2f}", f"{100 * statistics.median(extra):.3f}",
                    f"{100 * max(extra):.3f}", choose_svd_solver(shape, rank, "auto"),
                ]
            )  # fmt: skip
    return rows


def parallel_rows(weights: list[tuple[torch.Tensor, torch.Tensor]], repeats: int, threads: int) -> list[list]:
    def one(item):
        weight, importance = item
        return factorize(weight, max(1, round(0.25 * min(weight.shape))), importance)

    def sequential(count):
        torch.set_num_threads(count)
        for item in weights:
            one(item)
        torch.set_num_threads(threads)

    pool = ThreadPoolExecutor(2)

    def two_workers():
        torch.set_num_threads(1)
        list(pool.map(one, weights))
        torch.set_num_threads(threads)

    variants = {"sequential, 1 thread": lambda: sequential(1), "sequential, 2 threads": lambda: sequential(2)}
    variants["2 worker threads x 1"] = two_workers
    times = time_side_by_side(variants, repeats=repeats, min_time=0)
    pool.shutdown()
    base = "sequential, 1 thread"
    return [[name, f"{times[name]:.3f}", f"{times.speedup(base, name):.2f}"] for name in variants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024], help="square Gaussian matrix sizes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    set_threads(args.threads)
    print(f"# Factorisation: exact vs randomized SVD\n\n{machine_line()}\n")
    weights = minilm_weights_and_importances(16)
    groups: dict[str, list] = {}
    for name, (weight, importance) in weights.items():
        groups.setdefault(f"MiniLM {name.rsplit('.', 2)[-2]}.{name.rsplit('.', 1)[-1]}", []).append(
            (weight, importance)
        )
    by_shape: dict[tuple, list] = {}
    for items in groups.values():
        by_shape.setdefault(tuple(items[0][0].shape), []).extend(items)
    minilm = {f"MiniLM ({len(v)} layers)": v for v in by_shape.values()}
    generator = torch.Generator().manual_seed(0)
    synthetic = {}
    for size in args.sizes:
        weight = torch.randn(size, size, generator=generator) / size**0.5
        importance = torch.rand(size, generator=generator) ** 4  # skewed like real Fisher importances
        synthetic[f"Gaussian {size}"] = [(weight, importance)]
    headers = ["matrices", "shape", "n", "ratio", "rank", "full ms", "randomized ms", "speed-up",
               "extra w-err % (median)", "extra w-err % (max)", "auto picks"]  # fmt: skip
    print(markdown_table(headers, solver_rows({**minilm, **synthetic}, args.repeats)) + "\n")
    print("Factorising all MiniLM layers at rank ratio 0.25 (full SVD), seconds per model:\n")
    items = list(weights.values())
    rows = parallel_rows(items, args.repeats, args.threads)
    print(markdown_table(["schedule", "seconds", "speed-up vs sequential 1 thread"], rows) + "\n")
    print(f"finished: {machine_line()}")


if __name__ == "__main__":
    main()
