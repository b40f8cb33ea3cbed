"""`compress` with `FWSVDConfig(num_workers=2)` vs one worker on the MiniLM task model (plain SVD, so the time is the
factorisation alone), timed side by side with one torch thread; also checks the two results are bit-identical.

Run: ``PYTHONPATH=src:. python benchmarks/parallel_compress.py``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os

import torch

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(1)

    from transformers import AutoModelForSequenceClassification

    from benchmarks.task_model import build_task_model
    from hf_fwsvd import FWSVDConfig, compress

    print(f"# Parallel factorisation in `compress`\n\n{machine_line()}\n")
    dense = AutoModelForSequenceClassification.from_pretrained(build_task_model()).eval()

    def run(workers: int) -> torch.nn.Module:
        config = FWSVDConfig(rank_ratio=args.rank_ratio, method="svd", svd_solver="full", num_workers=workers)
        return compress(copy.deepcopy(dense), config, show_progress=False)

    serial, parallel = run(1).state_dict(), run(2).state_dict()
    identical = all(torch.equal(value, parallel[key]) for key, value in serial.items())
    variants = {workers: (lambda workers=workers: run(workers)) for workers in (1, 2, 3)}
    times = time_side_by_side(variants, repeats=args.repeats, min_time=0)
    rows = [[workers, f"{times[workers]:.2f}", f"{times.speedup(1, workers):.2f}x"] for workers in (1, 2, 3)]
    print(markdown_table(["num_workers", "compress s", "speed-up vs 1"], rows) + "\n")
    print(f"num_workers=2 bit-identical to num_workers=1: {identical}; torch threads after: {torch.get_num_threads()}")
    print(f"\nfinished: {machine_line()}")


if __name__ == "__main__":
    main()
