"""Methods beyond the paper on real models: metric vs parameters kept, with and without recovery fine-tuning.

Two tasks, real weights and data only (see ``benchmarks/assets.py``):

- ``classifier``: the all-MiniLM-L6-v2 polarity classifier (``benchmarks/task_model.py``), accuracy on the
  800-sentence dev split; calibration statistics from 256 training sentences.
- ``lm``: SmolLM2-135M (dequantised from the 4-bit GGUF), perplexity on held-out State of the Union addresses
  (2000 onwards, first ``--eval-tokens`` tokens, 512-token windows); calibration on 1990s addresses.

Every calibration statistic (row, element-wise and gradient-weighted Fisher; activation moments) is collected once
on the dense model and reused for every setting through ``compress(..., statistics=...)``. Each row of the CSV is one
(method, parameter fraction) setting; "kept" is the fraction of the targeted modules' weights kept (dense
modules left by the allocation count in full). Methods: ``svd``, ``fwsvd``, ``fwsvd+alloc`` (FWSVD with the global
Fisher allocation, ``allocation_power=0.5``; ``+alloc1`` for power 1), ``tfwsvd``, ``whiten``, ``whiten+alloc``,
``asvd``, ``fisher_whiten``; the uniform ones use ``param_ratio`` (the same fraction in every module), the
``+alloc`` ones ``param_budget`` at the same fraction.

Run from the repository root, e.g.::

    python benchmarks/bench_methods.py lm --ratios 0.8 --methods svd fwsvd whiten
    python benchmarks/bench_methods.py classifier --ratios 0.3 0.5 0.7 --finetune fwsvd@0.3 whiten@0.3
    python benchmarks/bench_methods.py plot
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import logging
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hf_fwsvd  # noqa: F401  (registers the quantization method)
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.evaluation import evaluate_classifier, evaluate_perplexity
from hf_fwsvd.finetune import finetune
from hf_fwsvd.methods import required_statistics
from hf_fwsvd.statistics import Statistics, collect
from hf_fwsvd.targets import find_target_modules

logger = logging.getLogger("bench_methods")

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "task", "setting", "method", "allocation", "target", "kept", "model_params", "metric", "value", "finetuned",
    "compress_s", "eval_s", "date", "machine",
]  # fmt: skip


def setting_config(setting: str, fraction: float, base: dict) -> FWSVDConfig:
    method, _, suffix = setting.partition("+")
    if suffix.startswith("alloc"):  # "alloc": the default allocation_power; "alloc1": allocation_power=1
        power = {"alloc": 0.5, "alloc1": 1.0, "alloc0": 0.0}[suffix]
        return FWSVDConfig(method=method, param_budget=fraction, allocation="fisher", allocation_power=power, **base)
    return FWSVDConfig(method=method, param_ratio=fraction, **base)


def kept_fraction(model: torch.nn.Module) -> float:
    report = model.fwsvd_report
    before = sum(row.params_before for row in report.modules)
    after = sum(row.params_after for row in report.modules)
    dense = sum(model.get_submodule(name).weight.numel() for name in report.dense_modules)
    return (after + dense) / (before + dense)


def collect_all(model, loader, targets, configs: list[FWSVDConfig]) -> Statistics:
    """Every statistic the settings' configs need, in one calibration pass on the dense model."""
    started = time.perf_counter()
    needed = list(dict.fromkeys(name for config in configs for name in required_statistics(config)))
    stats = collect(model, loader, targets, needed)
    logger.info("Calibration statistics (%s) collected in %.0f s", ", ".join(needed), time.perf_counter() - started)
    return stats


def write_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_task(args: argparse.Namespace) -> None:
    from benchmarks.assets import polarity_splits, smollm2_dir, sotu_split

    machine = f"{platform.machine()} {torch.get_num_threads()} threads (shared 2-core box)"
    date = datetime.date.today().isoformat()
    if args.task == "classifier":
        if args.task_model is None:
            from benchmarks.task_model import build_task_model

            args.task_model = build_task_model()
        tokenizer = AutoTokenizer.from_pretrained(args.task_model)
        dense = AutoModelForSequenceClassification.from_pretrained(args.task_model).eval()
        splits = polarity_splits()
        calibration = splits["train"][: args.calib]
        train = splits["train"][: args.finetune_samples]

        def evaluate(model):
            return evaluate_classifier(model, tokenizer, splits["dev"])["accuracy"]

        metric, base = "accuracy", {"calibration_dataset": calibration, "tokenizer": tokenizer, "max_length": 64}
        ft = {"epochs": args.finetune_epochs, "learning_rate": args.finetune_lr, "batch_size": 32, "max_length": 64}
    else:
        directory = smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        calib_years, eval_years = sotu_split()
        calib_ids = tokenizer("\n\n".join(calib_years[y] for y in sorted(calib_years))).input_ids
        chunks = [calib_ids[i : i + args.seq_len] for i in range(0, len(calib_ids) - args.seq_len, args.seq_len)]
        calibration = [{"input_ids": chunk} for chunk in chunks[: args.calib]]
        train = [{"input_ids": chunk} for chunk in chunks[args.calib : args.calib + args.finetune_samples]]
        held_out = "\n\n".join(eval_years[y] for y in sorted(eval_years))

        def evaluate(model):
            return evaluate_perplexity(model, tokenizer, held_out, window=512, max_tokens=args.eval_tokens)

        metric, base = "perplexity", {"calibration_dataset": calibration, "batch_size": 4, "max_length": args.seq_len}
        ft = {"epochs": args.finetune_epochs, "learning_rate": args.finetune_lr, "batch_size": 4, "max_length": 512}
    out = RESULTS / f"methods_{args.task}.csv"
    started = time.perf_counter()
    baseline = evaluate(dense)
    eval_s = time.perf_counter() - started
    params = sum(p.numel() for p in dense.parameters())
    logger.info("dense %s = %.4f (%.0f s)", metric, baseline, eval_s)
    row = dict(task=args.task, setting="dense", method="dense", allocation="", target=1.0, kept=1.0,
               model_params=params, metric=metric, value=baseline, finetuned=False, compress_s=0, eval_s=eval_s,
               date=date, machine=machine)  # fmt: skip
    write_rows(out, [row])
    probe = FWSVDConfig(method="svd", rank=1)
    targets = find_target_modules(dense, probe)
    loader = build_calibration_loader(calibration, tokenizer, dense, batch_size=base.get("batch_size", 8),
                                      max_length=base["max_length"], num_samples=None)  # fmt: skip
    configs = [setting_config(setting, fraction, base) for setting in args.methods for fraction in args.ratios]
    stats = collect_all(dense, loader, targets, configs)
    finetune_wanted = {tuple(item.split("@")) for item in args.finetune}
    for fraction in args.ratios:
        for setting in args.methods:
            if setting == "tfwsvd" and args.tfwsvd_ratios and fraction not in args.tfwsvd_ratios:
                continue
            config = setting_config(setting, fraction, base)
            config.refine_iterations = args.refine_iterations
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            compress(model, config, statistics=stats)
            compress_s = time.perf_counter() - started
            started = time.perf_counter()
            value = evaluate(model)
            eval_s = time.perf_counter() - started
            kept = kept_fraction(model)
            logger.info("%s @ %.2f: kept %.3f, %s = %.4f (compress %.0f s, eval %.0f s)", setting, fraction, kept,
                        metric, value, compress_s, eval_s)  # fmt: skip
            allocation = config.allocation or "uniform"
            row = dict(task=args.task, setting=setting, method=config.method, allocation=allocation, target=fraction,
                       kept=round(kept, 4), model_params=sum(p.numel() for p in model.parameters()),
                       metric=metric, value=value, finetuned=False, compress_s=round(compress_s, 1),
                       eval_s=round(eval_s, 1), date=date, machine=machine)  # fmt: skip
            write_rows(out, [row])
            if (setting, f"{fraction:g}") in finetune_wanted:
                started = time.perf_counter()
                finetune(model, train, tokenizer, show_progress=False, logging_steps=5, **ft)
                tuned_s = time.perf_counter() - started
                value = evaluate(model)
                logger.info("  + fine-tune (%.0f s): %s = %.4f", tuned_s, metric, value)
                write_rows(out, [dict(row, value=value, finetuned=True, compress_s=round(compress_s + tuned_s, 1))])
            del model


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, task in zip(axes, ("classifier", "lm"), strict=True):
        path = RESULTS / f"methods_{task}.csv"
        if not path.exists():
            axis.set_title(f"{task}: no results")
            continue
        rows = list(csv.DictReader(path.open()))
        dense = [float(r["value"]) for r in rows if r["setting"] == "dense"]
        if dense:
            axis.axhline(dense[-1], color="black", linestyle=":", label="dense")
        settings = sorted({r["setting"] for r in rows if r["setting"] != "dense"})
        for index, setting in enumerate(settings):
            color = f"C{index}"
            for tuned, style in (("False", "-o"), ("True", "--^")):
                points = sorted((float(r["kept"]), float(r["value"])) for r in rows
                                if r["setting"] == setting and r["finetuned"] == tuned)  # fmt: skip
                if points:
                    label = setting + (" + fine-tune" if tuned == "True" else "")
                    axis.plot(*zip(*points, strict=True), style, color=color, label=label)
        metric = rows[0]["metric"]
        axis.set_xlabel("fraction of targeted weights kept")
        axis.set_ylabel(metric)
        if metric == "perplexity":
            axis.set_yscale("log")
        titles = {"classifier": "MiniLM-L6 polarity (dev accuracy)", "lm": "SmolLM2-135M (SOTU perplexity)"}
        axis.set_title(titles[task])
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "methods.png", dpi=120)
    logger.info("wrote %s", RESULTS / "methods.png")


def table() -> str:
    """Markdown tables (one per task): rows = settings, columns = target fraction kept; the last row of a repeated
    setting wins, and fine-tuned results go in their own rows."""
    blocks = []
    for task in ("classifier", "lm"):
        path = RESULTS / f"methods_{task}.csv"
        if not path.exists():
            continue
        rows = list(csv.DictReader(path.open()))
        fractions = sorted({float(r["target"]) for r in rows if r["setting"] != "dense"}, reverse=True)
        cells: dict[str, dict[float, str]] = {}
        for r in rows:
            name = r["setting"] + (" + fine-tune" if r["finetuned"] == "True" else "")
            value = float(r["value"])
            text = f"{value:.4f}" if r["metric"] == "accuracy" else (f"{value:.1f}" if value < 1e5 else f"{value:.2e}")
            cells.setdefault(name, {})[float(r["target"])] = text
        metric = rows[0]["metric"]
        header = f"| {task} {metric} | " + " | ".join(f"{f:g} kept" for f in fractions) + " |"
        lines = [header, "|---" * (len(fractions) + 1) + "|"]
        lines.append(f"| dense | {cells.pop('dense')[1.0]} |" + " |" * (len(fractions) - 1))
        for name in sorted(cells, key=lambda n: (n.endswith("fine-tune"), n)):
            lines.append(f"| {name} | " + " | ".join(cells[name].get(f, "") for f in fractions) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["classifier", "lm", "plot", "table"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--methods", nargs="+",
                        default=["svd", "fwsvd", "fwsvd+alloc", "tfwsvd", "whiten", "whiten+alloc", "asvd",
                                 "fisher_whiten"])  # fmt: skip
    parser.add_argument("--tfwsvd-ratios", type=float, nargs="*", default=[], help="only these fractions for tfwsvd")
    parser.add_argument("--refine-iterations", type=int, default=3)
    parser.add_argument("--calib", type=int, default=256, help="calibration examples (sentences or chunks)")
    parser.add_argument("--seq-len", type=int, default=256, help="LM calibration chunk length in tokens")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--finetune", nargs="*", default=[], help="settings to fine-tune, as method@fraction")
    parser.add_argument("--finetune-samples", type=int, default=1024)
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--task-model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.task == "plot":
        plot()
    elif args.task == "table":
        print(table())
    else:
        run_task(args)


if __name__ == "__main__":
    main()
