"""`hf-fwsvd sweep`: compress at several ratios with each method, evaluate each, write a CSV and a PNG plot."""

from __future__ import annotations

import argparse
import copy
import csv
import os
import time
from typing import Any

from ..methods import available_methods, get_method
from .common import (
    EXIT_USAGE,
    TASKS,
    CommandError,
    add_data_arguments,
    add_metric_argument,
    check_metrics,
    evaluate_task,
    load_model,
    load_tokenizer,
    main_metric,
    pack_causal_calibration,
    read_examples,
    resolve_calibration_size,
)
from .compress import add_method_arguments, methods_epilog

__all__ = ["add_parser", "plot_sweep", "run"]

RATIO_KINDS = ("rank-ratio", "param-ratio", "param-budget")

EXAMPLES = """examples:
  hf-fwsvd sweep ./my-classifier --task sequence-classification --data train.csv --eval-data dev.csv \\
      --ratios 0.1,0.2,0.3,0.5 --output sweep/
  hf-fwsvd sweep ./gpt --task causal-lm --data corpus.txt --eval-data held-out.txt --methods whiten,fwsvd \\
      --ratio-kind param-budget --ratios 0.6,0.8 --output sweep-lm/
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep",
        help="Compress at several ratios with each method; write sweep.csv and sweep.png (metric vs params kept).",
        description="The calibration statistics every method needs are collected once and reused for every point; "
        "each point is a fresh copy of the dense model compressed and evaluated on --eval-data.",
        epilog=EXAMPLES + "\n" + methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="Dense model: a local folder or a Hub id.")
    parser.add_argument(
        "--task",
        required=True,
        choices=TASKS,
        metavar="TASK",
        help=f"One of: {', '.join(TASKS)}. Which task head (and loss) to load.",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder for sweep.csv and sweep.png.")
    add_data_arguments(parser)
    add_data_arguments(parser, prefix="eval-")
    parser.add_argument("--ratios", required=True, help="Comma-separated ratios, e.g. 0.1,0.2,0.33,0.5.")
    parser.add_argument(
        "--ratio-kind",
        choices=RATIO_KINDS,
        default="rank-ratio",
        help="Whether --ratios are rank ratios, parameter ratios (per module) or parameter budgets (in total, shared "
        "by --allocation) (default rank-ratio).",
    )
    parser.add_argument(
        "--methods",
        default="fwsvd,svd",
        help=f"Comma-separated methods, of: {', '.join(available_methods())} (default fwsvd,svd).",
    )
    add_method_arguments(parser, default=None)
    parser.add_argument(
        "--num-samples", type=int, metavar="N", default=None,
        help="Calibration examples (default 256; causal LM: blocks of --max-length tokens, 32,768 tokens' worth).",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, metavar="N", default=8, help="Calibration batch size (default 8).")
    parser.add_argument(
        "--max-length", type=int, metavar="N", default=None,
        help="Token truncation length (default 128; causal LM: calibration blocks of this many tokens, default 512).",
    )  # fmt: skip
    parser.add_argument("--eval-limit", type=int, metavar="N", help="Evaluate on the first N examples only.")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="Causal LM: score only the first N tokens.")
    parser.add_argument(
        "--num-labels", type=int, metavar="N", help="Labels of a new classification head (raw encoders)."
    )
    parser.add_argument("--tokenizer", metavar="PATH", help="Tokenizer folder or Hub id (default: MODEL).")
    add_metric_argument(parser)
    parser.set_defaults(run=run)
    return parser


def _parse_list(text: str, what: str, convert: Any) -> list[Any]:
    try:
        values = [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise CommandError(f"--{what} must be a comma-separated list, got {text!r} ({error}).", EXIT_USAGE) from error
    if not values:
        raise CommandError(f"--{what} is empty.", EXIT_USAGE)
    return values


def _check(args: argparse.Namespace) -> tuple[list[float], list[str]]:
    ratios = _parse_list(args.ratios, "ratios", float)
    upper = 1.0 if args.ratio_kind == "param-ratio" else 0.999999
    bad = [ratio for ratio in ratios if not 0 < ratio <= upper]
    if bad:
        bound = "(0, 1]" if args.ratio_kind == "param-ratio" else "(0, 1)"
        raise CommandError(f"--ratios for {args.ratio_kind} must be in {bound}; got {bad}.", EXIT_USAGE)
    methods = _parse_list(args.methods, "methods", str)
    unknown = [method for method in methods if method not in available_methods()]
    if unknown:
        raise CommandError(
            f"--methods accepts {', '.join(available_methods())}; got {', '.join(unknown)}.", EXIT_USAGE
        )
    if args.ratio_kind != "param-budget" and (args.allocation is not None or args.allocation_power is not None):
        raise CommandError("--allocation and --allocation-power need --ratio-kind param-budget.", EXIT_USAGE)
    if os.path.isfile(args.output):
        raise CommandError(f"--output {args.output!r} is a file; give a folder.", EXIT_USAGE)
    check_metrics(args.metrics, args.task)
    return sorted(set(ratios)), list(dict.fromkeys(methods))


def plot_sweep(rows: list[dict[str, Any]], metric: str, path: str, title: str) -> None:
    """Metric against the percentage of parameters kept: one line per method, the dense model as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(row["method"] for row in rows if row["method"] != "dense"):
        points = sorted((100 * row["params_kept"], row[metric]) for row in rows if row["method"] == method)
        entry = get_method(method)  # style and legend from the registry
        style = {"marker": "o", "linestyle": "-", **entry.plot_style}
        axis.plot(*zip(*points, strict=True), label=f"{entry.short_title} ({method})", linewidth=1.8, **style)
    dense = [row for row in rows if row["method"] == "dense"]
    if dense:
        axis.axhline(
            dense[0][metric], color="gray", linestyle="--", linewidth=1, label=f"dense ({dense[0][metric]:.4g})"
        )
    if metric == "perplexity":
        axis.set_yscale("log")
    axis.set_xlabel("parameters kept (% of the dense model)")
    axis.set_ylabel(metric + (" (lower is better)" if metric == "perplexity" else ""))
    axis.set_title(title, fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="best", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..api import compress
    from ..config import FWSVDConfig
    from ..methods import collect_statistics, required_statistics
    from ..targets import find_target_modules

    ratios, methods = _check(args)
    resolve_calibration_size(args)
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise CommandError("sweep draws its plot with matplotlib: pip install 'hf-fwsvd[plots]'.") from error
    dense = load_model(args.model, args.task, args.num_labels)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    calibration = read_examples(args, dense)
    if args.task == "causal-lm":
        calibration = pack_causal_calibration(args, calibration, tokenizer, dense)
    examples = read_examples(args, dense, prefix="eval-", limit=args.eval_limit)
    evaluate_kwargs = {"max_length": args.max_length, "max_tokens": args.max_tokens, "metrics": args.metrics}
    started = time.perf_counter()
    baseline = evaluate_task(dense, tokenizer, args.task, examples, **evaluate_kwargs)
    metric, _ = main_metric(baseline, args.metrics)
    rows = [
        {"method": "dense", "ratio": 1.0, "params_kept": 1.0, "seconds": time.perf_counter() - started, **baseline}
    ]
    settings = {"num_samples": args.num_samples, "batch_size": args.batch_size, "max_length": args.max_length}
    key = args.ratio_kind.replace("-", "_")
    allocation = {
        name: value
        for name, value in (("allocation", args.allocation), ("allocation_power", args.allocation_power))
        if value is not None
    }

    def point_config(method: str, ratio: float) -> FWSVDConfig:
        return FWSVDConfig(**{key: ratio}, method=method, **allocation)

    # Every statistic any point needs, collected once on the dense model and shared by all points.
    try:
        needed = tuple(
            dict.fromkeys(name for method in methods for name in required_statistics(point_config(method, ratios[0])))
        )
        stats = None
        if needed:
            config = FWSVDConfig(calibration_dataset=calibration, tokenizer=tokenizer, **settings)
            targets = find_target_modules(dense, config)
            stats = collect_statistics(dense, config, targets, show_progress=not args.quiet, statistics=needed)
    except ValueError as error:
        raise CommandError(str(error)) from error
    points = [(method, ratio) for method in methods for ratio in ratios]
    for method, ratio in tqdm(points, desc="Sweep", unit="model", disable=args.quiet):
        started = time.perf_counter()
        model = copy.deepcopy(dense)
        try:
            compress(model, point_config(method, ratio), show_progress=False, statistics=stats)
        except ValueError as error:
            raise CommandError(f"{method} at {args.ratio_kind} {ratio}: {error}") from error
        result = evaluate_task(model, tokenizer, args.task, examples, **evaluate_kwargs)
        kept = result["parameters"] / baseline["parameters"]
        rows.append(
            {"method": method, "ratio": ratio, "params_kept": kept, "seconds": time.perf_counter() - started, **result}
        )
        del model
    os.makedirs(args.output, exist_ok=True)
    csv_path, png_path = os.path.join(args.output, "sweep.csv"), os.path.join(args.output, "sweep.png")
    fields = (
        ["method", "ratio_kind", "ratio", "parameters", "params_kept"]
        + [name for name in baseline if name not in ("parameters",)]
        + ["seconds"]
    )
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "ratio_kind": args.ratio_kind})
    name = os.path.basename(os.path.normpath(args.model))
    title = f"{name}: {metric} vs parameters kept\n({args.ratio_kind} sweep, {len(examples)} evaluation examples)"
    plot_sweep(rows, metric, png_path, title)
    width = max(8, *(len(method) for method in methods))
    print(f"{'method':<{width}} {args.ratio_kind:>11} {'params kept':>12} {metric:>11}")
    for row in rows:
        ratio = "-" if row["method"] == "dense" else f"{row['ratio']:g}"
        print(f"{row['method']:<{width}} {ratio:>11} {row['params_kept']:>12.1%} {row[metric]:>11.4f}")
    print(f"\nWrote {csv_path} and {png_path}")
    return 0
