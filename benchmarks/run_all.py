"""Run every performance benchmark and write their tables to one file.

Run from the repository root: ``PYTHONPATH=src:. python benchmarks/run_all.py`` (``--out`` to choose the file the
tables go to; default ``benchmarks/results/performance_raw.md``).

Runs, in order (about five minutes of CPU time on two idle cores; the assets are fetched first if missing):

1. ``benchmarks/inference.py --threads 1 --repeats 7 --model-repeats 3`` (per-layer and whole-model tables, fp32
   and bf16, batch 1/8/32);
2. ``benchmarks/inference.py --threads 2 --batches 8 32 --dtypes fp32 --skip-model`` (the two-thread check);
3. ``benchmarks/fisher_speed.py --threads 1 --repeats 3``;
4. ``benchmarks/bench_factorize.py --threads 1 --repeats 3``;
5. ``benchmarks/load_size.py --threads 1``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = [
    ["benchmarks/inference.py", "--threads", "1", "--repeats", "7", "--model-repeats", "3"],
    ["benchmarks/inference.py", "--threads", "2", "--batches", "8", "32", "--dtypes", "fp32", "--skip-model"],
    ["benchmarks/fisher_speed.py", "--threads", "1", "--repeats", "3"],
    ["benchmarks/bench_factorize.py", "--threads", "1", "--repeats", "3"],
    ["benchmarks/load_size.py", "--threads", "1"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/performance_raw.md", help="where to write all tables")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    sections, start = [], time.perf_counter()
    for run in RUNS:
        began = time.perf_counter()
        print(f"$ python {' '.join(run)}", flush=True)
        result = subprocess.run([sys.executable, *run], cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode:
            sys.stderr.write(result.stderr)
            raise SystemExit(f"{run[0]} failed with exit code {result.returncode}")
        took = time.perf_counter() - began
        print(result.stdout, flush=True)
        sections.append(f"`python {' '.join(run)}` ({took:.0f} s)\n\n{result.stdout}")
    total = time.perf_counter() - start
    Path(ROOT / args.out).write_text("\n".join(sections) + f"\nTotal wall time: {total:.0f} s\n", encoding="utf-8")
    print(f"Total wall time: {total:.0f} s; tables written to {args.out}")


if __name__ == "__main__":
    main()
