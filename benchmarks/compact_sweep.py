"""The compact-model claim without recovery (issue #15): how much of a model can go within 1 point of dense.

For each model and task the dense model is compressed at several fractions of the block weights kept (the targeted
Linear weights; embeddings and the head stay dense), with three variants, and scored on the task's held-out split
(MPNet: the 500 **test** examples of `benchmarks.headline`; MiniLM polarity: the 800-sentence dev split of
`benchmarks.main_job`, never used for calibration):

* ``whiten``: activation-whitened SVD, the same fraction of weights in every module (``param_ratio``);
* ``whiten_alloc``: the same factors, ranks from the global Fisher allocation (``param_budget`` with
  ``allocation="fisher"`` and ``--allocation-power``);
* ``fwsvd``: the paper's row-Fisher SVD, uniform fraction.

One calibration pass (``--num-samples`` training examples, seed 0) collects the activation second moment and the row
Fisher once per task. The factorisation is nested: ``factorize`` returns ``up`` = the top left singular vectors of the
weighted matrix (exact SVD, ``svd_solver="full"``) and ``down = up^T W``, so the rank-``r`` factors are the first
``r`` columns / rows of any higher-rank ones. Each module is therefore factorised once, at the highest rank any
fraction needs, and every point slices it (`tests/test_compact_sweep.py` checks this equals compressing directly).
Fractions run from the largest down; a variant stops after its first point more than 1 point below dense unless
``--full-curve`` is given. Points are appended to ``results/headline/compact.csv`` (a rerun skips finished ones);
``--report`` prints the per-task verdicts.

Run from the repository root with ``PYTHONPATH=src:.``, e.g.
``python benchmarks/compact_sweep.py --model minilm`` or
``python benchmarks/compact_sweep.py --model mpnet --tasks polarity trec``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.compare_methods import append_row, read_rows
from hf_fwsvd import FWSVDConfig
from hf_fwsvd.allocation import allocate_ranks, direction_scores
from hf_fwsvd.factorize import LowRankFactors
from hf_fwsvd.layers import LowRankLinear, dense_weight
from hf_fwsvd.methods import collect_statistics, get_method
from hf_fwsvd.pipeline import fisher_mass, weighted_matrix
from hf_fwsvd.ranks import rank_for_param_ratio
from hf_fwsvd.replace import shape_of
from hf_fwsvd.targets import find_target_modules

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "headline" / "compact.csv"
FRACTIONS = [0.9, 0.8, 0.7, 0.6, 0.5]
VARIANTS = {"whiten": ("whiten", False), "whiten_alloc": ("whiten", True), "fwsvd": ("fwsvd", False)}
TOLERANCE = 0.01  # "within 1 point": one accuracy point, or 0.01 of Pearson r
FIELDS = [
    "model",
    "task",
    "variant",
    "allocation_power",
    "fraction",
    "num_samples",
    "seed",
    "metric",
    "dense_score",
    "score",
    "drop_points",
    "within_1pt",
    "block_kept",
    "params_kept",
    "compressed_modules",
    "eval_s",
]


def uniform_ranks(shapes: dict[str, tuple[int, int]], fraction: float) -> dict[str, int]:
    """Rank of every module keeping `fraction` of its weights (what ``param_ratio=fraction`` resolves to)."""
    return {name: rank_for_param_ratio(*shape, fraction, name) for name, shape in shapes.items()}


def allocation_scores(
    targets: dict[str, nn.Module], method: str, stats, power: float, floor: float
) -> dict[str, torch.Tensor]:
    """Direction scores of the global Fisher allocation, as `hf_fwsvd.pipeline.budget_ranks` computes them."""
    scorer = get_method(method)
    scores = {}
    for name, module in targets.items():
        weight = dense_weight(module)
        mass = fisher_mass(weight, stats["row_fisher"][name]) ** power
        scores[name] = direction_scores(weighted_matrix(weight, scorer.importance(name, stats), floor), mass)
    return scores


def block_kept(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> float:
    """Fraction of the targeted modules' weights kept: ``r (in + out)`` per factorised module, ``in out`` if dense."""
    dense = sum(out * inp for out, inp in shapes.values())
    kept = sum(ranks[n] * (out + inp) if n in ranks else out * inp for n, (out, inp) in shapes.items())
    return kept / dense


def nested_factors(
    targets: dict[str, nn.Module], method: str, ranks: dict[str, int], stats, config: FWSVDConfig
) -> dict[str, LowRankFactors]:
    """Every module in `ranks` factorised once at its rank with `method` (exact SVD, so the factors nest)."""
    config = copy.copy(config)
    config.svd_solver = "full"
    scorer = get_method(method)
    return {
        name: scorer.factorize(dense_weight(targets[name]), rank, name, stats, config) for name, rank in ranks.items()
    }


def truncated_model(dense: nn.Module, factors: dict[str, LowRankFactors], ranks: dict[str, int]) -> nn.Module:
    """A copy of `dense` whose modules in `ranks` are `LowRankLinear` from the first ``rank`` directions of
    `factors` (the rank-``rank`` factorisation of the same method)."""
    model = copy.deepcopy(dense)
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        weight = dense_weight(module)
        cut = LowRankFactors(down=factors[name].down[:rank].clone(), up=factors[name].up[:, :rank].clone())
        model.set_submodule(
            name, LowRankLinear.from_factors(cut, module.bias, dtype=weight.dtype, device=weight.device, name=name)
        )
    return model


@dataclass
class SweepPoint:
    fraction: float
    ranks: dict[str, int]
    block_kept: float


def sweep_points(
    dense: nn.Module,
    stats,
    method: str,
    fractions: list[float],
    allocation_power: float | None,
    config: FWSVDConfig,
) -> Iterator[tuple[SweepPoint, nn.Module]]:
    """Compressed copies of `dense` at each fraction of block weights kept, largest fraction first; a fraction that
    resolves to the same ranks as the one before it (``param_ratio`` stops at the speed pay-off rank, about 0.8 of the
    weights) is skipped.

    `allocation_power` `None` keeps the same fraction in every module; a float uses the global Fisher allocation with
    that power (modules it leaves dense stay dense). The factorisation runs once, lazily, at the first point.
    """
    targets = find_target_modules(dense, config)
    shapes = {name: shape_of(module) for name, module in targets.items()}
    fractions = sorted(fractions, reverse=True)
    if allocation_power is None:
        rank_maps = {f: uniform_ranks(shapes, f) for f in fractions}
    else:
        scores = allocation_scores(targets, method, stats, allocation_power, config.importance_floor)
        rank_maps = {f: allocate_ranks(shapes, scores, f).ranks for f in fractions}
    highest: dict[str, int] = {}
    for ranks in rank_maps.values():
        for name, rank in ranks.items():
            highest[name] = max(rank, highest.get(name, 0))
    factors = None
    previous = None
    for fraction in fractions:
        ranks = rank_maps[fraction]
        if ranks == previous:  # param_ratio clamps at the speed pay-off rank: a larger fraction gives the same model
            logger.info("fraction %s gives the same ranks as the one above it; skipped", fraction)
            continue
        previous = ranks
        if factors is None:
            factors = nested_factors(targets, method, highest, stats, config)
        yield SweepPoint(fraction, ranks, block_kept(shapes, ranks)), truncated_model(dense, factors, ranks)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Evaluator:
    """One model and task: the dense model, its calibration examples and how a compressed copy is scored."""

    def __init__(self, model_name: str, task: str, num_samples: int) -> None:
        self.model_name, self.task = model_name, task
        if model_name == "minilm":
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from benchmarks.assets import polarity_splits
            from benchmarks.task_model import build_task_model

            directory = build_task_model()
            splits = polarity_splits()
            self.tokenizer = AutoTokenizer.from_pretrained(directory)
            self.dense = AutoModelForSequenceClassification.from_pretrained(directory)
            self.eval_examples, self.metric, self.max_length = splits["dev"], "accuracy", 64
            train = splits["train"]
        else:
            from benchmarks.headline import TaskRun
            from benchmarks.task_model import TOKEN_MAX_LENGTH

            self.run = TaskRun(task)
            self.tokenizer, self.dense, self.metric = self.run.tokenizer, self.run.dense, self.run.metric
            self.max_length = TOKEN_MAX_LENGTH if self.run.token else 64
            train = self.run.splits["train"]
        from benchmarks.headline import calibration_sample

        self.calibration = calibration_sample(train, num_samples, 0)
        self.dense_params = _params(self.dense)

    def config(self, allocation_power: float = 0.5) -> FWSVDConfig:
        """The calibration config: whitening statistics plus the row Fisher (for fwsvd and the allocation)."""
        return FWSVDConfig(
            method="whiten",
            param_budget=0.5,
            allocation="fisher",
            allocation_power=allocation_power,
            calibration_dataset=self.calibration,
            tokenizer=self.tokenizer,
            num_samples=len(self.calibration),
            batch_size=16,
            max_length=self.max_length,
        )

    def score(self, model: nn.Module) -> float:
        if self.model_name == "minilm":
            from hf_fwsvd.evaluation import evaluate_classifier

            return float(
                evaluate_classifier(model, self.tokenizer, self.eval_examples, metrics=("accuracy",))["accuracy"]
            )
        return self.run.evaluate(model)[0]


def _key(row: dict) -> str:
    return "|".join(str(row[k]) for k in ("model", "task", "variant", "allocation_power", "fraction", "num_samples"))


def run_task(args: argparse.Namespace, task: str) -> None:
    evaluator = Evaluator(args.model, task, args.num_samples)
    done = {_key(row): row for row in read_rows(RESULTS)}
    dense_rows = [row for row in done.values() if row["model"] == args.model and row["task"] == task]
    if dense_rows:
        dense_score = float(dense_rows[0]["dense_score"])
    else:
        dense_score = evaluator.score(evaluator.dense)
    logger.info("%s %s dense %s = %.4f", args.model, task, evaluator.metric, dense_score)
    config = evaluator.config(args.allocation_power)
    stats = None
    for variant in args.variants:
        method, allocated = VARIANTS[variant]
        power = args.allocation_power if allocated else ""
        base = {"model": args.model, "task": task, "variant": variant, "allocation_power": power}
        base |= {"num_samples": args.num_samples, "seed": 0, "metric": evaluator.metric, "dense_score": dense_score}
        wanted = [f for f in args.fractions if _key(base | {"fraction": f}) not in done]
        previous = [done[_key(base | {"fraction": f})] for f in args.fractions if f not in wanted]
        if not wanted or (not args.full_curve and any(r["within_1pt"] == "0" for r in previous)):
            continue
        if stats is None:
            start = time.perf_counter()
            stats = collect_statistics(
                evaluator.dense, config, find_target_modules(evaluator.dense, config), None, False
            )
            logger.info("statistics in %.1f s", time.perf_counter() - start)
        start = time.perf_counter()
        points = sweep_points(
            evaluator.dense, stats, method, wanted, args.allocation_power if allocated else None, config
        )
        for point, model in points:
            tick = time.perf_counter()
            value = evaluator.score(model)
            drop = round((dense_score - value) * 100, 2)
            row = base | {
                "fraction": point.fraction,
                "score": round(value, 5),
                "drop_points": drop,
                "within_1pt": int(drop <= TOLERANCE * 100),
                "block_kept": round(point.block_kept, 4),
                "params_kept": round(_params(model) / evaluator.dense_params, 4),
                "compressed_modules": len(point.ranks),
                "eval_s": round(time.perf_counter() - tick, 1),
            }
            append_row(RESULTS, row, FIELDS)
            logger.info(
                "%s %s=%.4f drop %.2f (%.0f s since factorising began)",
                _key(row),
                evaluator.metric,
                value,
                drop,
                time.perf_counter() - start,
            )
            if not row["within_1pt"] and not args.full_curve:
                break


def report(path: Path = RESULTS) -> list[str]:
    """One line per model, task and variant: the smallest fraction kept within 1 point of dense (no point above it
    missing the tolerance), with the block and whole-model fractions removed, then the curve (block weights kept:
    score)."""
    rows = read_rows(path)
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"], row["variant"], row["allocation_power"]), []).append(row)
    for (model, task, variant, power), group in groups.items():
        unique = {r["block_kept"]: r for r in sorted(group, key=lambda r: float(r["fraction"]))}
        group = sorted(unique.values(), key=lambda r: -float(r["block_kept"]))  # one row per distinct model
        best = None
        for row in group:
            if row["within_1pt"] != "1":
                break
            best = row
        curve = ", ".join(f"{float(r['block_kept']):.2f}: {float(r['score']) * 100:.1f}" for r in group)
        label = f"{variant} (power {power})" if power else variant
        if best is None:
            verdict = "none within 1 point"
        else:
            verdict = (
                f"{(1 - float(best['block_kept'])) * 100:.0f}% of block weights / "
                f"{(1 - float(best['params_kept'])) * 100:.1f}% of all parameters removable"
            )
        lines.append(f"{model} {task} (dense {float(group[0]['dense_score']) * 100:.1f}) {label}: {verdict}; {curve}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="mpnet")
    parser.add_argument("--tasks", nargs="+", default=["polarity"], help="MPNet tasks (MiniLM: polarity only)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--fractions", nargs="+", type=float, default=FRACTIONS, help="block weights kept")
    parser.add_argument("--allocation-power", type=float, default=0.5, help="power of whiten_alloc's allocation")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration examples (seed 0)")
    parser.add_argument("--full-curve", action="store_true", help="score every fraction, not only down to a miss")
    parser.add_argument("--report", action="store_true", help="print the verdicts from compact.csv, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from benchmarks.headline import quiet_logging

    quiet_logging()
    if args.report:
        print("\n".join(report()))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.model == "minilm" and args.tasks != ["polarity"]:
        raise SystemExit("--model minilm has one task model: --tasks polarity.")
    for task in args.tasks:
        run_task(args, task)


if __name__ == "__main__":
    main()
