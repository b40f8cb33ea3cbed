"""The paper's headline at BERT-base scale: SVD vs Fisher-weighted SVD on all-mpnet-base-v2 task models.

For each task (`benchmarks.assets.TASKS`; task models from `benchmarks.task_model.build_mpnet_task_model`) the dense
model is compressed with every method at every rank ratio, for several seeds (each seed draws a different calibration
sample from the training split), and scored on the task's held-out **test** split (500 examples never used for
calibration, head training or any choice). Optional extras, all on the same test examples:

* ``--recovery-ratios``: the compressed model's head refitted with the task model's own head fit (`fit_head` on the
  compressed encoder's features of the first ``--recovery-examples`` head-training examples), seed 0 only;
* ``--finetune-ratios``: a short recovery fine-tune of the compressed encoder (`benchmarks.recovery`: the block
  weights trained for ``--finetune-steps`` steps on the first 2,000 training examples, by distilling the dense task
  model's hidden states or on the task labels, ``--finetune-objective``), for ``--finetune-methods`` at the seeds
  ``--finetune-seeds`` (default 0; a seed's fine-tune also uses it for its batch order and dropout; `svd`, which
  reads no calibration sample, gets one fine-tune per listed seed, its rows carrying that seed, "" for 0);
  ``--finetune-dense`` runs the same fine-tune (seed 0) on the dense model. Rows carry the stage
  ``finetune_<objective>_<steps>_<learning rate>`` (plus ``_n<examples>`` when ``--finetune-train-size`` is not
  2,000: the first examples of `benchmarks.recovery.recovery_examples`); training times go to
  ``results/headline/finetune_log.jsonl``;
* ``--int8``: `torch.ao.quantization.quantize_dynamic` int8 on the dense model and on the compressed models at
  ``--int8-ratios``, with forward time measured side by side (`--timing`) and saved size;
* ``--estimators``: `fwsvd` with other Fisher estimators (``fisher_estimator=``) at ``--estimator-ratios``;
* ``--sample-counts``: `fwsvd` (or ``--sample-count-methods``) with other calibration sizes at
  ``--estimator-ratios`` (seed 0; a count above the training split's size uses all of it and is recorded as that size).

Every finished point is appended at once to ``results/headline/points.csv`` and its per-example predictions to
``results/headline/<task>_predictions.jsonl`` (a rerun skips finished points). ``--report`` prints the tables with
mean +- std over seeds and paired tests (McNemar for accuracy, paired bootstrap for the regression Pearson r) and
draws ``results/headline/headline.png`` (no fine-tune, and after the most-run recovery fine-tune).

Run from the repository root with ``PYTHONPATH=src``, e.g.
``python benchmarks/headline.py --tasks polarity trec --methods svd fwsvd whiten`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer

from benchmarks.assets import TASKS, TOKEN_TASKS, task_splits
from benchmarks.compare_methods import append_row, read_rows
from benchmarks.recovery import OBJECTIVES, RECOVERY_ARGS, recovery_examples, recovery_finetune
from benchmarks.task_model import (
    HEAD_ARGS,
    TOKEN_MAX_LENGTH,
    build_mpnet_task_model,
    fit_head,
    load_mpnet,
    task_features,
    task_labels,
    word_rows,
)
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.evaluation import length_sorted_batches
from hf_fwsvd.methods import collect_statistics
from hf_fwsvd.targets import find_target_modules

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "headline"
FIELDS = [
    "task",
    "method",
    "estimator",
    "num_samples",
    "ratio",
    "seed",
    "stage",
    "int8",
    "metric",
    "score",
    "loss",
    "params_kept",
    "block_kept",
    "stats_s",
    "compress_s",
    "eval_s",
]
CALIBRATION = {"batch_size": 16, "max_length": 64}


def point_key(row: dict) -> str:
    return "|".join(
        str(row[k]) for k in ("task", "method", "estimator", "num_samples", "ratio", "seed", "stage", "int8")
    )


def read_points(path: Path = RESULTS / "points.csv") -> list[dict]:
    return read_rows(path)


def finetune_stage(
    objective: str, steps: int, learning_rate: float, train_size: int = RECOVERY_ARGS["train_size"]
) -> str:
    """The `stage` of a recovery fine-tune's rows, e.g. ``finetune_distill_125_0.0002`` (``..._n2900`` on 2,900
    training examples): one per recipe."""
    size = f"_n{train_size}" if train_size != RECOVERY_ARGS["train_size"] else ""
    return f"finetune_{objective}_{steps}_{learning_rate:g}{size}"


def calibration_sample(train: list[dict], count: int, seed: int) -> list[dict]:
    """`count` training examples drawn with ``random.Random(1000 + seed)``: a different sample per seed."""
    return random.Random(1000 + seed).sample(train, min(count, len(train)))


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer, examples: list[dict], max_length: int = 64) -> torch.Tensor:
    """Logits (``n x labels``) in the order of `examples`, from length-sorted batches of 64."""
    model.eval()
    out: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    for idx, batch in length_sorted_batches(tokenizer, examples, 64, max_length):
        for row, i in zip(model(**batch).logits.float(), idx, strict=True):
            out[i] = row
    return torch.stack(out)


def test_labels(task: str, examples: list[dict]) -> torch.Tensor:
    """The labels scored on `examples`: one per example, or one per word (flattened) for token tasks."""
    return task_labels(task, examples)


def score(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> tuple[float, float, list]:
    """``(metric, mean loss, per-example predictions)``: accuracy / cross-entropy, or Pearson r / squared error."""
    if regression:
        pred = logits.squeeze(-1)
        r = float(torch.corrcoef(torch.stack([pred, labels]))[0, 1])
        return r, float((pred - labels).square().mean()), [round(v, 4) for v in pred.tolist()]
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    pred = logits.argmax(-1)
    return float((pred == labels).float().mean()), loss, pred.tolist()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _block_params(model: torch.nn.Module) -> int:
    total = 0
    for module in find_target_modules(model, FWSVDConfig()).values():
        total += sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))
    return total


def quantized(model: torch.nn.Module, per_channel: bool = False) -> torch.nn.Module:
    """Dynamic int8 (weights int8, activations quantised per batch) of every `nn.Linear`, on a copy.

    The default is the one-line ``quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`` (one weight scale per
    tensor); `per_channel` uses ``per_channel_dynamic_qconfig`` (one scale per output row) instead.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {torch.nn.Linear: per_channel_dynamic_qconfig} if per_channel else {torch.nn.Linear}
    return quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)


def saved_mb(model: torch.nn.Module) -> float:
    """Bytes of ``torch.save(state_dict)``: comparable between fp32, low-rank and int8 models."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


class TaskRun:
    """One task: its dense model, splits and the bookkeeping of finished points."""

    def __init__(self, task: str, test_size: int | None = None) -> None:
        self.task = task
        self.regression = TASKS[task][0] == 1
        self.metric = TASKS[task][2]
        self.dir = build_mpnet_task_model(task)
        self.splits = task_splits(task)
        self.token = task in TOKEN_TASKS
        self.test = self.splits["test"][:test_size] if test_size else self.splits["test"]
        self.labels = test_labels(task, self.test)
        self.tokenizer = AutoTokenizer.from_pretrained(self.dir)
        self.dense = load_mpnet(task, self.dir)
        self.dense_params = _params(self.dense)
        self.dense_block = _block_params(self.dense)
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.csv = RESULTS / "points.csv"
        self.preds = RESULTS / f"{task}_predictions.jsonl"
        self.done = {point_key(row) for row in read_points(self.csv)}

    def key(self, **row) -> str:
        return point_key({"task": self.task} | row)

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float, list]:
        """``(metric, mean loss, per-example predictions)`` of `model` on the test examples."""
        if self.token:  # per word: the logits at each word's first sub-word
            logits = word_rows(lambda batch: model(**batch).logits, self.tokenizer, self.test)
        else:
            logits = predict(model, self.tokenizer, self.test)
        return score(logits, self.labels, self.regression)

    def record(self, model: torch.nn.Module, row: dict) -> dict:
        start = time.perf_counter()
        value, loss, preds = self.evaluate(model)
        full = {"task": self.task, "metric": self.metric, "score": round(value, 5), "loss": round(loss, 5)} | row
        full["eval_s"] = round(time.perf_counter() - start, 1)
        if "params_kept" not in full and not row.get("int8"):
            full["params_kept"] = round(_params(model) / self.dense_params, 4)
        append_row(self.csv, full, FIELDS)
        with self.preds.open("a") as f:
            f.write(json.dumps({"key": point_key(full), "pred": preds}) + "\n")
        self.done.add(point_key(full))
        logger.info("%s %s", point_key(full), f"{self.metric}={value:.4f} loss={loss:.4f} ({full['eval_s']} s)")
        return full

    def recover(self, model: torch.nn.Module, examples: int) -> torch.nn.Module:
        """The task model's head fit again, on the compressed encoder's features (a copy; the encoder unchanged)."""
        model = copy.deepcopy(model)
        train = self.splits["train"][:examples]
        features = task_features(model, self.tokenizer, self.task, train)
        args = {k: v for k, v in HEAD_ARGS.items() if k not in ("train_size", "max_length")}
        fit_head(model, features, task_labels(self.task, train), **args)
        return model

    def finetune(self, model: torch.nn.Module, args: argparse.Namespace, key: str, seed: int = 0) -> torch.nn.Module:
        """A copy of `model` after the recovery fine-tune (`recovery_finetune`, teacher: the dense task model,
        `seed`: its batch order and dropout).

        Its training log (seconds, losses) is appended to ``finetune_log.jsonl`` under the point's `key`.
        """
        if self.token:
            raise ValueError(f"--finetune-ratios supports sentence tasks only, not the token task {self.task!r}.")
        model = copy.deepcopy(model)
        info = recovery_finetune(
            model,
            self.tokenizer,
            recovery_examples(self.splits["train"], args.finetune_train_size),
            args.finetune_objective,
            teacher=self.dense,
            steps=args.finetune_steps,
            learning_rate=args.finetune_lr,
            seed=seed,
        )
        with (RESULTS / "finetune_log.jsonl").open("a") as f:
            f.write(json.dumps({"key": key, "load_average": list(os.getloadavg())} | info) + "\n")
        return model


def finetune_seeds(args: argparse.Namespace, seed: int | str, ratio: float, method: str) -> list[int]:
    """The fine-tune seeds of a point: its calibration seed when listed in ``--finetune-seeds``, or every listed seed
    for a point without one (`svd` reads no calibration sample)."""
    if ratio not in args.finetune_ratios or method not in args.finetune_methods:
        return []
    if seed == "":
        return list(args.finetune_seeds)
    return [seed] if seed in args.finetune_seeds else []


def finetune_row(common: dict, finetune_seed: int) -> dict:
    """`common` with the seed its fine-tuned row carries: a point without a calibration seed (`svd`) carries its
    fine-tune seed ("" for 0, as the seed-0 rows always did)."""
    return common if common["seed"] != "" else common | {"seed": finetune_seed or ""}


def run_task(args: argparse.Namespace, task: str) -> None:
    run = TaskRun(task, args.test_size)
    base = {"estimator": "", "num_samples": "", "int8": 0}
    if run.key(method="dense", ratio=1.0, seed="", stage="none", **base) not in run.done:
        run.record(run.dense, {"method": "dense", "ratio": 1.0, "seed": "", "stage": "none", "block_kept": 1.0} | base)
    if args.int8 and run.key(method="dense", ratio=1.0, seed="", stage="none", **(base | {"int8": 1})) not in run.done:
        row = {"method": "dense", "ratio": 1.0, "seed": "", "stage": "none", "block_kept": 1.0} | base | {"int8": 1}
        run.record(quantized(run.dense), row)
    if args.int8_per_channel:
        row = {"method": "dense", "ratio": 1.0, "seed": "", "stage": "none", "block_kept": 1.0} | base | {"int8": 2}
        if point_key({"task": task} | row) not in run.done:
            run.record(quantized(run.dense, per_channel=True), row)
    stage = finetune_stage(args.finetune_objective, args.finetune_steps, args.finetune_lr, args.finetune_train_size)
    if args.finetune_dense and run.key(method="dense", ratio=1.0, seed="", stage=stage, **base) not in run.done:
        key = run.key(method="dense", ratio=1.0, seed="", stage=stage, **base)
        row = {"method": "dense", "ratio": 1.0, "seed": "", "stage": stage, "block_kept": 1.0} | base
        run.record(run.finetune(run.dense, args, key), row)

    def points(method: str, seed: int | str, estimator: str, num_samples: int | str, ratios: list[float]) -> None:
        common = {"method": method, "estimator": estimator, "num_samples": num_samples, "seed": seed}
        wanted = []
        for ratio in ratios:
            keys = [run.key(ratio=ratio, stage="none", int8=0, **common)]
            if seed in (0, "") and ratio in args.recovery_ratios and method in args.recovery_methods:
                keys.append(run.key(ratio=ratio, stage="recovery", int8=0, **common))
            for finetune_seed in finetune_seeds(args, seed, ratio, method):
                keys.append(run.key(ratio=ratio, stage=stage, int8=0, **finetune_row(common, finetune_seed)))
            if seed in (0, "") and args.int8 and ratio in args.int8_ratios and estimator in ("", "empirical"):
                keys.append(run.key(ratio=ratio, stage="none", int8=1, **common))
                if args.int8_per_channel:
                    keys.append(run.key(ratio=ratio, stage="none", int8=2, **common))
            if any(key not in run.done for key in keys):
                wanted.append(ratio)
        if not wanted:
            return
        calibration = calibration_sample(run.splits["train"], int(num_samples or 1), int(seed or 0))
        config = FWSVDConfig(
            method=method,
            calibration_dataset=calibration,
            tokenizer=run.tokenizer,
            num_samples=len(calibration),
            fisher_estimator=estimator or "empirical",
            refine_iterations=args.refine_iterations,
            **(CALIBRATION | ({"max_length": TOKEN_MAX_LENGTH} if run.token else {})),
        )
        start = time.perf_counter()
        stats = collect_statistics(run.dense, config, find_target_modules(run.dense, config), None, False)
        stats_s = round(time.perf_counter() - start, 1)
        for ratio in wanted:
            model = copy.deepcopy(run.dense)
            start = time.perf_counter()
            point_config = copy.copy(config)
            point_config.rank_ratio = ratio
            compress(model, point_config, show_progress=False, statistics=stats)
            row = common | {"ratio": ratio, "stats_s": stats_s, "compress_s": round(time.perf_counter() - start, 1)}
            row["block_kept"] = round(_block_params(model) / run.dense_block, 4)
            if run.key(ratio=ratio, stage="none", int8=0, **common) not in run.done:
                run.record(model, row | {"stage": "none", "int8": 0})
            if seed in (0, "") and ratio in args.recovery_ratios and method in args.recovery_methods:
                if run.key(ratio=ratio, stage="recovery", int8=0, **common) not in run.done:
                    run.record(run.recover(model, args.recovery_examples), row | {"stage": "recovery", "int8": 0})
            for finetune_seed in finetune_seeds(args, seed, ratio, method):
                tuned = finetune_row(common, finetune_seed)
                key = run.key(ratio=ratio, stage=stage, int8=0, **tuned)
                if key not in run.done:
                    tuned_model = run.finetune(model, args, key, finetune_seed)
                    run.record(tuned_model, row | tuned | {"stage": stage, "int8": 0})
            if seed in (0, "") and args.int8 and ratio in args.int8_ratios and estimator in ("", "empirical"):
                if run.key(ratio=ratio, stage="none", int8=1, **common) not in run.done:
                    run.record(quantized(model), row | {"stage": "none", "int8": 1})
                if args.int8_per_channel and run.key(ratio=ratio, stage="none", int8=2, **common) not in run.done:
                    run.record(quantized(model, per_channel=True), row | {"stage": "none", "int8": 2})
            del model

    if "svd" in args.methods:
        points("svd", "", "", "", args.ratios)
    for seed in args.seeds:
        for method in args.methods:
            if method != "svd":
                points(method, seed, "empirical", args.num_samples, args.ratios)
    for estimator in args.estimators:
        for seed in args.seeds:
            points("fwsvd", seed, estimator, args.num_samples, args.estimator_ratios)
    for count in args.sample_counts:
        for method in args.sample_count_methods:
            points(method, 0, "empirical", min(count, len(run.splits["train"])), args.estimator_ratios)


def timing_batches(run: TaskRun, count: int) -> list[dict]:
    """The first `count` test examples of `run`, sorted by length, in padded batches of 32 (max length 64)."""
    examples = sorted(run.test[:count], key=lambda e: len(e["text"]))
    return [
        run.tokenizer(
            [e["text"] for e in examples[i : i + 32]],
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
        for i in range(0, len(examples), 32)
    ]


def quiet_logging() -> None:
    """Timestamped INFO logs from the benchmark, warnings only from transformers, hf_fwsvd and torchao."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("transformers", "hf_fwsvd", "torchao"):
        logging.getLogger(name).setLevel(logging.WARNING)


def timing(args: argparse.Namespace) -> dict:
    """Forward time and saved size of dense, int8, low-rank and low-rank + int8 models, measured side by side.

    Speed depends only on the shapes, so the low-rank models are plain-SVD ones at ``--timing-ratios`` (an FWSVD model
    at the same rank ratio has the same shapes). Each model runs the same ``--timing-examples`` test examples
    (batches of 32, length-sorted, max length 64) in ``--timing-rounds`` interleaved rounds; the minimum is kept.
    """
    run = TaskRun(args.tasks[0])
    models = {
        "dense": run.dense,
        "dense int8": quantized(run.dense),
        "dense int8 per-channel": quantized(run.dense, per_channel=True),
    }
    for ratio in args.timing_ratios:
        model = copy.deepcopy(run.dense)
        compress(model, FWSVDConfig(method="svd", rank_ratio=ratio), show_progress=False)
        models[f"rank ratio {ratio}"] = model
        models[f"rank ratio {ratio} + int8"] = quantized(model)
        models[f"rank ratio {ratio} + int8 per-channel"] = quantized(model, per_channel=True)
    batches = timing_batches(run, args.timing_examples)
    seconds = {name: math.inf for name in models}
    with torch.no_grad():
        for _ in range(args.timing_rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for batch in batches:
                    model(**batch)
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    result = {
        "task": run.task,
        "examples": len(run.test[: args.timing_examples]),
        "rounds": args.timing_rounds,
        "threads": torch.get_num_threads(),
        "load_average": list(__import__("os").getloadavg()),
        "models": {name: {"seconds": seconds[name], "mb": round(saved_mb(models[name]), 1)} for name in models},
    }
    (RESULTS / "timing.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, value in result["models"].items():
        print(
            f"{name:<28} {value['seconds']:7.2f} s  {seconds['dense'] / value['seconds']:5.2f}x  {value['mb']:7.1f} MB"
        )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "whiten", "tfwsvd"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.33, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=128, help="calibration examples per seed")
    parser.add_argument("--refine-iterations", type=int, default=3, help="ALS sweeps of tfwsvd")
    parser.add_argument("--recovery-ratios", nargs="*", type=float, default=[])
    parser.add_argument("--recovery-methods", nargs="*", default=["svd", "fwsvd", "whiten", "tfwsvd"])
    parser.add_argument("--recovery-examples", type=int, default=1000)
    parser.add_argument("--finetune-ratios", nargs="*", type=float, default=[], help="recovery fine-tune")
    parser.add_argument("--finetune-seeds", nargs="*", type=int, default=[0], help="seeds given a fine-tune")
    parser.add_argument("--finetune-methods", nargs="*", default=["svd", "fwsvd", "whiten", "tfwsvd"])
    parser.add_argument("--finetune-objective", choices=OBJECTIVES, default=RECOVERY_ARGS["objective"])
    parser.add_argument("--finetune-steps", type=int, default=RECOVERY_ARGS["steps"])
    parser.add_argument("--finetune-lr", type=float, default=RECOVERY_ARGS["learning_rate"])
    parser.add_argument("--finetune-train-size", type=int, default=RECOVERY_ARGS["train_size"])
    parser.add_argument("--finetune-dense", action="store_true", help="also the same fine-tune of the dense model")
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--int8-per-channel", action="store_true", help="also per-channel int8 (int8=2 rows)")
    parser.add_argument("--int8-ratios", nargs="*", type=float, default=[0.33, 0.5])
    parser.add_argument("--estimators", nargs="*", default=[], choices=["batch", "true"])
    parser.add_argument("--estimator-ratios", nargs="*", type=float, default=[0.33])
    parser.add_argument("--sample-counts", nargs="*", type=int, default=[], help="calibration sizes (seed 0)")
    parser.add_argument(
        "--sample-count-methods", nargs="*", default=["fwsvd"], help="methods run at each of --sample-counts"
    )
    parser.add_argument("--test-size", type=int, help="score on the first N test examples only (smoke runs)")
    parser.add_argument("--timing", action="store_true", help="measure forward time and size instead (first task)")
    parser.add_argument("--timing-ratios", nargs="*", type=float, default=[0.33, 0.5])
    parser.add_argument("--timing-examples", type=int, default=128)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--report", action="store_true", help="print the tables and draw the plot, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logging()
    if args.report:
        from benchmarks.headline_report import main as report

        report()
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.timing:
        timing(args)
        return
    for task in args.tasks:
        run_task(args, task)


if __name__ == "__main__":
    main()
