"""Low rank and int8 side by side on MPNet task models (issue #15): which recipe is faster AND smaller than one-line
dynamic int8 at no more accuracy loss?

Per task, in ONE process with one torch thread, these models of the same dense task model:

* ``dense``: fp32;
* ``dynamic int8``: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`` (weights int8
  per tensor, activations quantised per batch at run time; `benchmarks.headline.quantized`);
* ``weight-only int8``: torchao ``quantize_(model, Int8WeightOnlyConfig())`` on every `nn.Linear` (weights int8 per
  output channel, activations stay float), the storage `factor_dtype="int8"` uses for factors;
* ``whiten <f>``: activation-whitened SVD keeping the fraction ``f`` (``--fraction``) of every block module's weights
  (``param_ratio=f``, 128 calibration examples of the training split, seed 0);
* ``whiten <f> + dynamic int8``: the same low-rank model through ``quantize_dynamic``;
* ``whiten <f> + int8 factors``: the same low-rank model with its factors stored as the library's weight-only int8
  (`hf_fwsvd.factor_storage.quantize_factors`; the head stays fp32).

Each model is scored on the task's 500 held-out test examples (`benchmarks.headline.TaskRun`); its forward time is
the minimum over ``--rounds`` interleaved rounds of the same ``--timing-examples`` test examples (length-sorted
batches of 32, max length 64); its size is the bytes of ``torch.save(state_dict)``. Results go to
``results/headline/int8_compare.json``.

Run from the repository root with ``PYTHONPATH=src:.``:
``python benchmarks/int8_compare.py --tasks polarity trec --fraction 0.8``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.headline import RESULTS, TaskRun, calibration_sample, quantized, saved_mb, timing_batches
from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.factor_storage import quantize_factors

logger = logging.getLogger(__name__)


def weight_only_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `nn.Linear` weight stored as torchao per-channel weight-only int8."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(model)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def with_int8_factors(model: nn.Module) -> nn.Module:
    """A copy of a compressed `model` whose `LowRankLinear` factors are the library's weight-only int8."""
    model = copy.deepcopy(model)
    names = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    quantize_factors(model, names)
    return model


def whitened(run: TaskRun, fraction: float, num_samples: int, seed: int = 0) -> nn.Module:
    """A copy of `run.dense` compressed by activation whitening keeping `fraction` of every block module's weights,
    calibrated on `num_samples` training examples drawn with `seed` (`calibration_sample`)."""
    low_rank = copy.deepcopy(run.dense)
    config = FWSVDConfig(
        method="whiten",
        param_ratio=fraction,
        calibration_dataset=calibration_sample(run.splits["train"], num_samples, seed),
        tokenizer=run.tokenizer,
        num_samples=num_samples,
        batch_size=16,
        max_length=64,
    )
    start = time.perf_counter()
    compress(low_rank, config, show_progress=False)
    logger.info("%s: whiten %s compressed in %.0f s", run.task, fraction, time.perf_counter() - start)
    return low_rank


def candidates(run: TaskRun, fraction: float, num_samples: int) -> dict[str, nn.Module]:
    """The six models compared, built from `run.dense` (see the module docstring)."""
    low_rank = whitened(run, fraction, num_samples)
    return {
        "dense": run.dense,
        "dynamic int8": quantized(run.dense),
        "weight-only int8": weight_only_int8(run.dense),
        f"whiten {fraction}": low_rank,
        f"whiten {fraction} + dynamic int8": quantized(low_rank),
        f"whiten {fraction} + int8 factors": with_int8_factors(low_rank),
    }


def forward_seconds(models: dict[str, nn.Module], batches: list[dict], rounds: int) -> dict[str, float]:
    """Minimum over `rounds` interleaved rounds of each model's time to run every batch."""
    seconds = {name: math.inf for name in models}
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                model.eval()
                start = time.perf_counter()
                for batch in batches:
                    model(**batch)
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds


def compare_task(run: TaskRun, args: argparse.Namespace) -> dict:
    models = candidates(run, args.fraction, args.num_samples)
    batches = timing_batches(run, args.timing_examples)
    load_before = os.getloadavg()
    seconds = forward_seconds(models, batches, args.rounds)
    load_after = os.getloadavg()
    rows = {}
    for name, model in models.items():
        start = time.perf_counter()
        value = run.evaluate(model)[0]
        rows[name] = {
            "score": round(value, 5),
            "forward_s": round(seconds[name], 3),
            "speedup": round(seconds["dense"] / seconds[name], 3),
            "mb": round(saved_mb(model), 1),
            "eval_s": round(time.perf_counter() - start, 1),
        }
        logger.info("%s %s %s", run.task, name, rows[name])
    return {
        "task": run.task,
        "metric": run.metric,
        "timing_examples": len(run.test[: args.timing_examples]),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "load_average_before_after": [list(load_before), list(load_after)],
        "models": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["polarity", "trec"])
    parser.add_argument("--fraction", type=float, default=0.8, help="whiten: fraction of each module's weights kept")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--timing-examples", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "int8_compare.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("transformers", "hf_fwsvd", "torchao"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = json.loads(args.output.read_text()) if args.output.is_file() else {}
    for task in args.tasks:
        result = compare_task(TaskRun(task), args)
        results[f"{task}|{args.fraction}"] = result
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\n{task} ({result['metric']}), {result['timing_examples']} examples, 1 thread:")
        for name, row in result["models"].items():
            print(
                f"  {name:<32} {row['score'] * 100:6.1f}  {row['forward_s']:7.2f} s  {row['speedup']:5.2f}x  "
                f"{row['mb']:7.1f} MB"
            )


if __name__ == "__main__":
    main()
