"""Peak memory (RSS) of compressing SmolLM2-135M in memory (`compress`) and block by block (`compress_layerwise`).

Every measurement runs in a fresh Python process and reads its own ``ru_maxrss``, so runs do not see each other's
allocations. Runs, in order:

- ``baseline``: import torch, transformers and hf_fwsvd only (the floor every run pays).
- ``normal``: `from_pretrained` + `compress` (Fisher on the calibration texts) + `save_pretrained`. It also saves the
  importances (``importances_cache``) for the two factorisation-only runs.
- ``layerwise``: `compress_layerwise` with the Fisher estimated block by block (the default: one block's weights in
  memory at a time, a block-wise backward pass), then block-by-block factorisation; it also saves the importances
  when ``normal`` did not run before it.
- ``layerwise-offload``: `compress_layerwise` with the Fisher estimated on a model loaded with
  ``device_map="auto", max_memory={"cpu": <--cpu-budget>}`` (the rest offloaded to disk), then block-by-block
  factorisation.
- ``factorise-normal`` / ``factorise-layerwise``: the same two paths with precomputed importances (no Fisher), which
  isolates the factorisation phase.

Usage::

    PYTHONPATH=src:. python benchmarks/large_models.py [--samples 16] [--cpu-budget 200MiB] [--out results.md]

Needs the SmolLM2 checkpoint and State of the Union texts from ``benchmarks/assets.py`` (``smollm2_dir()``,
``sotu_split()``), or ``--model-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("baseline", "normal", "layerwise", "layerwise-offload", "factorise-normal", "factorise-layerwise")


def _calibration_texts(samples: int) -> list[str]:
    sys.path.insert(0, ROOT)
    from benchmarks.assets import sotu_split

    calibration, _ = sotu_split()
    paragraphs = [p.strip() for year in sorted(calibration) for p in calibration[year].split("\n") if len(p) > 200]
    return paragraphs[:samples]


def _child(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_fwsvd
    from hf_fwsvd import FWSVDConfig, compress, compress_layerwise

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    work, cache = args.work, os.path.join(args.work, "importances.safetensors")
    common = {"rank_ratio": args.rank_ratio, "method": args.method}
    if args.run in ("normal", "layerwise", "layerwise-offload"):
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        common.update(
            calibration_dataset=_calibration_texts(args.samples), tokenizer=tokenizer, num_samples=args.samples,
            batch_size=args.batch_size, max_length=args.max_length,
        )  # fmt: skip
    if args.run == "normal":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        compress(model, FWSVDConfig(importances_cache=cache, **common), show_progress=False)
        model.save_pretrained(os.path.join(work, "normal"))
    elif args.run == "layerwise":
        compress_layerwise(
            args.model_dir, os.path.join(work, "layerwise"), FWSVDConfig(importances_cache=cache, **common),
            dtype=torch.float32, show_progress=False,
        )  # fmt: skip
    elif args.run == "layerwise-offload":
        compress_layerwise(
            args.model_dir, os.path.join(work, "layerwise-offload"), FWSVDConfig(**common), device_map="auto",
            max_memory={"cpu": args.cpu_budget}, offload_folder=os.path.join(work, "offload"), dtype=torch.float32,
            show_progress=False,
        )  # fmt: skip
    elif args.run == "factorise-normal":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        compress(model, FWSVDConfig(importances=cache, **common), show_progress=False)
        model.save_pretrained(os.path.join(work, "factorise-normal"))
    elif args.run == "factorise-layerwise":
        compress_layerwise(
            args.model_dir,
            os.path.join(work, "factorise-layerwise"),
            FWSVDConfig(importances=cache, **common),
            show_progress=False,
        )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"run": args.run, "peak_mib": peak_kib / 1024, "seconds": time.perf_counter() - start,
                      "hf_fwsvd": hf_fwsvd.__version__, "torch": torch.__version__}))  # fmt: skip


def _sizes(model_dir: str) -> dict[str, float]:
    """fp32 MiB of the whole checkpoint, its largest block and its largest non-block tensor."""
    from safetensors import safe_open

    from hf_fwsvd.layerwise import _weight_files

    blocks: dict[str, int] = {}
    other = total = 0
    for key, path in _weight_files(model_dir).items():
        with safe_open(path, framework="pt") as handle:
            shape = handle.get_slice(key).get_shape()
        numel = 1
        for size in shape:
            numel *= size
        total += numel
        parts = key.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None:
            other = max(other, numel)
        else:
            block = ".".join(parts[: index + 1])
            blocks[block] = blocks.get(block, 0) + numel
    mib = 4 / 2**20
    return {"model": total * mib, "block": max(blocks.values()) * mib, "blocks": len(blocks), "other": other * mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank-ratio", type=float, default=0.33)
    parser.add_argument("--cpu-budget", default="200MiB")
    parser.add_argument("--method", help="compression method (default: the library's choice for a causal LM)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of the runs")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.run:
        _child(args)
        return
    if args.model_dir is None:
        sys.path.insert(0, ROOT)
        from benchmarks.assets import smollm2_dir

        args.model_dir = str(smollm2_dir())
    results = {}
    with tempfile.TemporaryDirectory(prefix="fwsvd-large-") as work:
        for run in args.runs.split(","):
            command = [sys.executable, os.path.abspath(__file__), "--run", run, "--work", work]
            for name in ("model_dir", "samples", "batch_size", "max_length", "rank_ratio", "cpu_budget", "threads"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            command += ["--method", args.method] if args.method else []
            env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            results[run] = json.loads(output.strip().splitlines()[-1])
            print(
                f"{run:<22} peak RSS {results[run]['peak_mib']:8.0f} MiB   {results[run]['seconds']:6.1f} s",
                flush=True,
            )
    sizes = _sizes(args.model_dir)
    base = results["baseline"]["peak_mib"]
    lines = [
        f"Model: {args.model_dir} ({sizes['model']:.0f} MiB fp32, {sizes['blocks']} blocks of "
        f"{sizes['block']:.1f} MiB, "
        f"largest non-block tensor {sizes['other']:.1f} MiB). Fisher: {args.samples} SOTU paragraphs, batch "
        f"{args.batch_size}, max length {args.max_length}; method {args.method or 'default'}; rank_ratio "
        f"{args.rank_ratio}; offload budget "
        f"cpu={args.cpu_budget}; {args.threads} thread(s); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared); torch {results['baseline']['torch']}, date {time.strftime('%Y-%m-%d')}.",
        "",
        "| run | peak RSS (MiB) | above import floor (MiB) | wall (s) |",
        "|---|---:|---:|---:|",
    ]
    for run in results:
        peak = results[run]["peak_mib"]
        lines.append(f"| {run} | {peak:.0f} | {peak - base:.0f} | {results[run]['seconds']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
