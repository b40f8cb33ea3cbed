"""`hf-fwsvd export-onnx`: export a compressed (or dense) checkpoint to ONNX, keeping its low-rank layers."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import EXIT_USAGE, TASKS, CommandError, check_input_path, load_model

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  hf-fwsvd export-onnx ./my-classifier-fwsvd ./my-classifier-onnx --task sequence-classification
  hf-fwsvd export-onnx ./gpt-fwsvd ./gpt-onnx --task causal-lm
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-onnx",
        help="Export a checkpoint to ONNX (torch.onnx dynamo exporter): two MatMuls per low-rank layer.",
        description="Writes OUT/model.onnx (inputs input_ids and attention_mask, dynamic batch and length; output "
        "logits), config.json and the tokenizer, then runs the file in onnxruntime and compares it with PyTorch. "
        "Causal LMs are exported without a KV cache. Needs pip install 'hf-fwsvd[onnx]'.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="A checkpoint folder or Hub id (FWSVD-compressed or dense).")
    parser.add_argument("output", metavar="OUT", help="Folder for model.onnx, config.json and the tokenizer.")
    parser.add_argument("--task", required=True, choices=TASKS, metavar="TASK", help=f"One of: {', '.join(TASKS)}.")
    parser.add_argument("--opset", type=int, metavar="N", help="ONNX opset version (default: the exporter's).")
    parser.add_argument("--no-check", action="store_true", help="Skip the onnxruntime comparison with PyTorch.")
    parser.add_argument("--overwrite", action="store_true", help="Write into OUT even if it is not empty.")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..onnx_export import export_onnx

    check_input_path(args.model, "MODEL")
    if os.path.isfile(args.output):
        raise CommandError(f"OUT {args.output!r} is a file; give a folder.", EXIT_USAGE)
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise CommandError(f"OUT {args.output!r} is not empty; pass --overwrite or choose another folder.", EXIT_USAGE)
    model = load_model(args.model, args.task)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    try:
        check = not args.no_check
        result = export_onnx(model, args.output, tokenizer=tokenizer, opset_version=args.opset, check=check)
    except ImportError as error:
        raise CommandError(str(error)) from error
    size = os.path.getsize(result.path) / 2**20
    print(
        f"Wrote {result.path} ({size:.1f} MiB; output `{result.output_name}`): {result.low_rank_modules} low-rank "
        f"modules, {result.matmuls} MatMul nodes{'' if tokenizer else '; no tokenizer found to copy'}."
    )
    if result.max_abs_diff is not None:
        print(f"onnxruntime vs PyTorch on a 3 x 11 test batch: max abs difference {result.max_abs_diff:.2e}")
    return 0
