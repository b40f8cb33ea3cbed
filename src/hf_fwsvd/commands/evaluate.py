"""`hf-fwsvd evaluate`: the task metric and parameter count of a dense or compressed model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import (
    TASKS,
    add_data_arguments,
    add_metric_argument,
    check_metrics,
    evaluate_task,
    load_model,
    load_tokenizer,
    read_examples,
)

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  hf-fwsvd evaluate ./my-classifier-fwsvd --task sequence-classification --data dev.csv
  hf-fwsvd evaluate ./my-classifier-fwsvd --task sequence-classification --data dev.csv --metric matthews_correlation
  hf-fwsvd evaluate ./gpt-fwsvd --task causal-lm --data held_out.txt --max-tokens 4096 --json
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="Measure a model's task metric and parameter count.",
        description="Sequence classification: accuracy and F1 (or the --metric ones); token classification: word "
        "accuracy; causal LM: perplexity over non-overlapping windows. Metrics are computed with `evaluate` modules "
        "shipped with hf_fwsvd (accuracy, f1, matthews_correlation) or local metric scripts, so no network access "
        "is needed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="A local folder or Hub id (dense or FWSVD-compressed).")
    parser.add_argument(
        "--task",
        required=True,
        choices=TASKS,
        metavar="TASK",
        help=f"One of: {', '.join(TASKS)}. Which task head to load and score.",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--eval-limit",
        "--limit",
        dest="limit",
        type=int,
        metavar="N",
        help="Evaluate on the first N examples only (the same name as in `compress` and `sweep`; `--limit` is an "
        "alias).",
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", default=32, help="Examples per forward pass (default 32)."
    )
    parser.add_argument(
        "--max-length", type=int, metavar="N", default=128, help="Token truncation length (default 128)."
    )
    parser.add_argument(
        "--window", type=int, metavar="N", default=512, help="Causal LM: tokens per window (default 512)."
    )
    parser.add_argument("--max-tokens", type=int, metavar="N", help="Causal LM: score only the first N tokens.")
    add_metric_argument(parser)
    parser.add_argument("--tokenizer", metavar="PATH", help="Tokenizer folder or Hub id (default: MODEL).")
    parser.add_argument("--json", action="store_true", help="Print the result as one JSON object.")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..data_files import describe_source
    from ..serialization import is_fwsvd_model
    from .common import EXIT_USAGE, CommandError

    for name, option in (("limit", "eval-limit"), ("batch_size", "batch-size"), ("max_length", "max-length"),
                         ("max_tokens", "max-tokens")):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CommandError(f"--{option} must be positive, got {value}.", EXIT_USAGE)
    if args.window < 2:
        raise CommandError(f"--window must be at least 2, got {args.window}.", EXIT_USAGE)
    check_metrics(args.metrics, args.task)
    model = load_model(args.model, args.task)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    examples = read_examples(args, model, limit=args.limit)
    result = evaluate_task(
        model,
        tokenizer,
        args.task,
        examples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        window=args.window,
        max_tokens=args.max_tokens,
        metrics=args.metrics,
    )
    ranks = getattr(getattr(model.config, "quantization_config", None), "ranks", None)
    compression = f"FWSVD, {len(ranks)} low-rank modules" if is_fwsvd_model(model) and ranks else "dense"
    if args.json:
        print(
            json.dumps(
                {"model": args.model, "task": args.task, "data": args.data, "compression": compression, **result}
            )
        )
        return 0
    print(f"{'model':<12} {args.model}")
    print(f"{'task':<12} {args.task}")
    print(f"{'data':<12} {describe_source(args.data, len(examples))}")
    print(f"{'parameters':<12} {result['parameters']:,} ({compression})")
    for name, value in result.items():
        if name not in ("parameters", "num_examples"):
            print(f"{name:<12} {value:.4f}" if isinstance(value, float) else f"{name:<12} {value:,}")
    return 0
