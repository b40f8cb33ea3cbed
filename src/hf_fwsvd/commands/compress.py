"""`hf-fwsvd compress`: compress a model with any registered method, print the per-layer table, save (and push) it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .common import (
    EXIT_USAGE,
    TASKS,
    CommandError,
    add_data_arguments,
    add_metric_argument,
    check_hub_reachable,
    check_input_path,
    check_metrics,
    check_output_path,
    evaluate_task,
    load_model,
    load_tokenizer,
    pack_causal_calibration,
    read_examples,
    resolve_calibration_size,
)

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EXAMPLES = """examples:
  hf-fwsvd compress ./my-classifier --task sequence-classification --data train.csv --rank-ratio 0.33 \\
      --eval-data dev.csv --output ./my-classifier-fwsvd
  hf-fwsvd compress ./gpt --task causal-lm --data corpus.txt --param-ratio 0.5 --output ./gpt-fwsvd
  hf-fwsvd compress ./my-classifier --task sequence-classification --method svd --rank 64 --output ./svd64
  hf-fwsvd compress ./gpt --task causal-lm --data corpus.txt --method whiten --param-budget 0.8 \\
      --allocation-power 1 --output ./gpt-whiten
"""


def methods_epilog() -> str:
    """The `methods:` section of `--help`: every registered method and its one-line summary."""
    from ..methods import available_methods, get_method

    names = available_methods()
    width = max(len(name) for name in names)
    return "methods:\n" + "\n".join(f"  {name:<{width}}  {get_method(name).summary}" for name in names) + "\n"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compress",
        help="Compress a model and save the factorised checkpoint (with its model card).",
        description="Estimate Fisher importances on task data, factorise every targeted linear layer, print a "
        "per-layer report and save a checkpoint that `from_pretrained` reloads once `hf_fwsvd` is imported.",
        epilog=EXAMPLES + "\n" + methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="Dense model: a local folder or a Hub id.")
    parser.add_argument("--task", required=True, choices=TASKS, metavar="TASK", help=f"One of: {', '.join(TASKS)}.")
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder to save the compressed model into.")
    data = parser.add_argument_group("calibration data (needed by methods that read data and by --allocation fisher)")
    add_data_arguments(data, required=False)
    data.add_argument(
        "--num-samples", type=int, default=None, metavar="N",
        help="Examples to use (default 256; causal LM: blocks of --max-length tokens, default 32,768 tokens' worth).",
    )  # fmt: skip
    data.add_argument("--batch-size", type=int, default=8, metavar="N", help="Batch size (default 8).")
    data.add_argument(
        "--max-length", type=int, default=None, metavar="N",
        help="Truncation length (default 128; causal LM: the text file, lines joined, is cut into blocks this long, "
        "default 512).",
    )  # fmt: skip
    how = parser.add_argument_group("how much to compress (one of; default --rank-ratio 0.33)")
    ranks = how.add_mutually_exclusive_group()
    ranks.add_argument("--rank-ratio", type=float, metavar="R", help="Keep this fraction of each module's full rank.")
    ranks.add_argument("--rank", type=int, metavar="N", help="The same rank for every module.")
    ranks.add_argument(
        "--param-ratio", type=float, metavar="P", help="Keep about this fraction of each module's weights."
    )
    ranks.add_argument(
        "--param-budget",
        type=float,
        metavar="P",
        help="Keep this fraction of the targeted weights in total; --allocation shares it between modules.",
    )
    how.add_argument(
        "--method",
        choices=_method_choices(),
        default=None,
        metavar="METHOD",
        help=f"One of: {', '.join(_method_choices())} (see 'methods:' below). Default: kfac_svdllm with "
        "--param-budget 0.8 and the global allocation (power 1) for a causal LM (kfac_whiten, without the update, "
        "and power 0.75 from 131,072 calibration tokens on), fwsvd (the paper) otherwise.",
    )
    add_method_arguments(how, default=None)
    how.add_argument(
        "--target-modules", metavar="NAMES", help="Comma-separated module names/suffixes (default: all block linears)."
    )
    how.add_argument(
        "--rank-multiple",
        type=int,
        metavar="N",
        help="Round every rank down to a multiple of N (8 or 16 suit GPU tensor cores and int8 kernels).",
    )
    how.add_argument(
        "--num-workers",
        type=int,
        default=1,
        metavar="N",
        help="Threads that factorise modules side by side (default 1; 2 gave 1.8x on an idle 2-core CPU).",
    )
    how.add_argument(
        "--factor-dtype",
        choices=["int8"],
        default=None,
        metavar="DTYPE",
        help="Store the factors as per-channel weight-only int8 through torchao (`pip install torchao`); saved and "
        "reloaded as int8. Default: the model dtype.",
    )
    how.add_argument(
        "--budget-unit",
        choices=["params", "bytes"],
        default="params",
        metavar="UNIT",
        help="What --param-budget counts: params (weights, the default) or bytes as stored (int8 factors cost 1 byte "
        "per element), so a byte budget buys int8 factors a higher rank.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--num-labels", type=int, metavar="N", help="Labels of a new classification head.")
    model.add_argument("--tokenizer", metavar="PATH", help="Tokenizer folder or Hub id (default: MODEL).")
    model.add_argument("--base-model", metavar="HUB_ID", help="Hub id of the dense model, for the model card.")
    evaluation = parser.add_argument_group("evaluation before/after (optional; goes into the model card)")
    add_data_arguments(evaluation, prefix="eval-", required=False)
    evaluation.add_argument("--eval-limit", type=int, metavar="N", help="Evaluate on the first N examples only.")
    add_metric_argument(evaluation)
    evaluation.add_argument(
        "--fail-on-collapse",
        action="store_true",
        help="Exit with code 1 (saving nothing) when the evaluation shows a collapsed model (perplexity above 3x the "
        "dense one, accuracy at chance) instead of only warning.",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--overwrite", action="store_true", help="Replace the checkpoint files already in --output.")
    output.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the result to this Hub repo.")
    output.add_argument("--report-json", metavar="FILE", help="Also write the per-layer report as JSON.")
    parser.set_defaults(run=run)
    return parser


def add_method_arguments(group: Any, default: str | None = "fwsvd") -> None:
    """`--method` (choices from the registry; `None` as `default` leaves it out) and the allocation options."""
    from ..config import ALLOCATIONS
    from ..methods import available_methods

    if default is not None:
        group.add_argument(
            "--method",
            choices=available_methods(),
            default=default,
            metavar="METHOD",
            help=f"One of: {', '.join(available_methods())} (see 'methods:' below). Default: {default}.",
        )
    group.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        help="With a parameter budget: 'fisher' (default; global allocation by the Fisher-weighted error, needs "
        "labelled data) or 'uniform' (the same fraction in every module).",
    )
    group.add_argument(
        "--allocation-power",
        type=float,
        metavar="A",
        help="Exponent on each module's Fisher mass in the 'fisher' allocation, in [0, 1] (default 0.5; a causal LM "
        "without --method gets 1, or 0.75 from 131,072 calibration tokens, unless this is given).",
    )
    group.add_argument(
        "--sink-threshold",
        type=float,
        metavar="X",
        help="With the 'fisher' allocation: keep a module dense when the first token's mean output energy is over X "
        "times a later token's (attention sinks; 50 picks SmolLM2's six). Default: off.",
    )
    group.add_argument(
        "--first-token-weight",
        type=float,
        metavar="W",
        help="Weight in [0, 1] of each calibration sequence's first token in the gradient-weighted moments of "
        "fisher_whiten / kfac_whiten / fisher_svdllm / kfac_svdllm (1 keeps them as collected).",
    )


def needs_data(method: str, budget: float | None, allocation: str | None) -> str | None:
    """Why a run needs calibration data (an option to name in the error), or `None` when it does not."""
    from ..methods import get_method

    if get_method(method).needs_data:
        return f"--method {method}"
    if budget is not None and allocation in (None, "fisher"):
        return "--allocation fisher (the default with --param-budget)"
    return None


def _method_choices() -> tuple[str, ...]:
    from ..methods import available_methods

    return available_methods()


def _check_arguments(args: argparse.Namespace) -> None:
    if args.method is None:  # resolved per model by `compress`; every default reads data
        reason = "The default method" if not args.data else None
    else:
        reason = needs_data(args.method, args.param_budget, args.allocation)
    if reason and not args.data:
        other = "--allocation uniform" if reason.startswith("--allocation") else "--method svd"
        raise CommandError(f"{reason} needs calibration data: pass --data FILE (or use {other}).", EXIT_USAGE)
    if args.fail_on_collapse and not args.eval_data:
        raise CommandError("--fail-on-collapse needs an evaluation: pass --eval-data FILE.", EXIT_USAGE)
    for name in ("num_samples", "batch_size", "max_length", "rank", "num_labels", "eval_limit", "rank_multiple",
                 "num_workers"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {value}.", EXIT_USAGE)
    for name in ("rank_ratio", "param_ratio", "param_budget"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= (1 if name == "param_ratio" else 0.999999):
            bound = "(0, 1]" if name == "param_ratio" else "(0, 1)"
            raise CommandError(f"--{name.replace('_', '-')} must be in {bound}, got {value}.", EXIT_USAGE)
    check_input_path(args.model, "Model")
    check_metrics(args.metrics, args.task)
    check_output_path(args.output, [], "--output", args.overwrite)
    if os.path.isdir(args.model) and os.path.isdir(args.output) and os.path.samefile(args.model, args.output):
        raise CommandError("--output is the MODEL folder; save the compressed model somewhere else.", EXIT_USAGE)
    report_dir = os.path.dirname(os.path.abspath(args.report_json)) if args.report_json else None
    if report_dir and not (os.path.isdir(report_dir) and os.access(report_dir, os.W_OK)):
        raise CommandError(
            f"--report-json {args.report_json!r} cannot be written: {report_dir!r} is not a writable folder.",
            EXIT_USAGE,
        )
    if args.push_to_hub:
        check_hub_reachable(args.push_to_hub)


def _config(args: argparse.Namespace, examples: list[dict] | None, tokenizer: Any) -> Any:
    from ..config import FWSVDConfig

    ranks = {
        "rank": args.rank,
        "rank_ratio": args.rank_ratio,
        "param_ratio": args.param_ratio,
        "param_budget": args.param_budget,
        "allocation": args.allocation,
        "allocation_power": args.allocation_power,
        "sink_threshold": args.sink_threshold,
        "first_token_weight": args.first_token_weight,
    }
    targets = [name.strip() for name in args.target_modules.split(",")] if args.target_modules else None
    try:
        return FWSVDConfig(
            **{key: value for key, value in ranks.items() if value is not None},
            method=args.method,
            target_modules=targets,
            calibration_dataset=examples,
            tokenizer=tokenizer,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            max_length=args.max_length,
            rank_multiple=args.rank_multiple,
            num_workers=args.num_workers,
            factor_dtype=args.factor_dtype,
            budget_unit=args.budget_unit,
            base_model=args.base_model or (None if os.path.isdir(args.model) else args.model),
        )
    except ValueError as error:
        raise CommandError(str(error), EXIT_USAGE) from error


def settings_line(config: Any, method_given: bool) -> str:
    """The settings `compress` used, resolved defaults included (the causal-LM default's method and power depend on
    the model and the calibration size), as one line for the terminal.

    Args:
        config ([`FWSVDConfig`]): The saved config (`model.config.quantization_config`) after compression.
        method_given (`bool`): Whether the user chose the method (`--method`).
    """
    parts = [f"method={config.method}" + ("" if method_given else " (the default for this model)")]
    size = next((name for name in ("rank", "param_ratio", "param_budget", "rank_ratio") if getattr(config, name, None)
                 is not None), None)  # fmt: skip
    if size is not None:
        parts.append(f"{size}={getattr(config, size)}")
    if size == "param_budget":
        parts.append(f"allocation={config.allocation}")
        if config.allocation == "fisher":
            parts.append(f"allocation_power={config.allocation_power:g}")
        if config.sink_threshold is not None:
            parts.append(f"sink_threshold={config.sink_threshold:g}")
    if getattr(config, "first_token_weight", None) is not None:
        parts.append(f"first_token_weight={config.first_token_weight:g}")
    return "settings: " + ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    from ..api import compress
    from ..data_files import describe_source
    from ..model_card import record_evaluation

    _check_arguments(args)
    resolve_calibration_size(args)
    model = load_model(args.model, args.task, args.num_labels)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    examples = read_examples(args, model) if args.data else None
    if examples is not None and args.task == "causal-lm":
        examples = pack_causal_calibration(args, examples, tokenizer, model)
    eval_examples = read_examples(args, model, prefix="eval-", limit=args.eval_limit) if args.eval_data else None
    config = _config(args, examples, tokenizer)
    before = None
    evaluation_kwargs = {"max_length": args.max_length, "metrics": args.metrics}
    if eval_examples:
        before = evaluate_task(model, tokenizer, args.task, eval_examples, **evaluation_kwargs)
    try:
        compress(model, config, show_progress=not args.quiet)
    except ValueError as error:
        raise CommandError(str(error)) from error
    report = model.fwsvd_report
    if examples is not None and args.task == "causal-lm":
        used = min(len(examples), config.num_samples or len(examples))
        block = len(examples[0]["input_ids"])
        report.calibration_data = describe_source(args.data, used, f"blocks of {block} tokens")
    elif examples is not None:
        report.calibration_data = describe_source(args.data, len(examples))
    print(settings_line(model.config.quantization_config, method_given=args.method is not None))
    print(report.format_table())
    if eval_examples:
        after = evaluate_task(model, tokenizer, args.task, eval_examples, **evaluation_kwargs)
        record_evaluation(
            model, after, describe_source(args.eval_data, len(eval_examples)), before=before, split=args.eval_split
        )
        print()
        print(f"{'evaluation':<14} {'dense':>12} {'compressed':>12}")
        for name in model.fwsvd_evaluation.metric_names():
            print(f"{name:<14} {before.get(name, float('nan')):>12.4f} {after[name]:>12.4f}")
        collapse = model.fwsvd_evaluation.collapse
        if collapse:
            print(f"\nWARNING: {collapse}", file=sys.stderr)
            if args.fail_on_collapse:
                raise CommandError(f"{collapse} Nothing was saved (--fail-on-collapse).")
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    if args.report_json:
        payload = report.to_dict()
        if eval_examples:
            payload["evaluation"] = {"dataset": args.eval_data, "before": before, "after": after}
        with open(args.report_json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    print(f"\nSaved to {args.output} (model card: {os.path.join(args.output, 'README.md')})")
    if args.push_to_hub:
        commit = model.push_to_hub(args.push_to_hub)
        tokenizer.push_to_hub(args.push_to_hub)
        print(f"Pushed to {getattr(commit, 'repo_url', args.push_to_hub)}")
    return 0
