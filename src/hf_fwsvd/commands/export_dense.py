"""`hf-fwsvd export-dense`: turn a compressed checkpoint into a plain dense one that needs no hf_fwsvd."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .common import EXIT_USAGE, CommandError, check_output_path, count_parameters

__all__ = ["add_parser", "run"]

DTYPES = ("float32", "float16", "bfloat16")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-dense",
        help="Multiply the factors back into dense layers and save a checkpoint plain transformers loads.",
        description="Each low-rank layer becomes the dense layer up @ down (the same function, rank-limited), so "
        "apps without hf_fwsvd can load the model. The file is as large as the original dense model.",
    )
    parser.add_argument("directory", metavar="DIR", help="An FWSVD checkpoint folder (or Hub id).")
    parser.add_argument("output", metavar="OUT", help="Folder for the dense checkpoint.")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the dense weights (default: the checkpoint's).")
    parser.add_argument("--overwrite", action="store_true", help="Write into OUT even if it is not empty.")
    parser.set_defaults(run=run)
    return parser


def _model_class(directory: str) -> Any:
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise CommandError(f"Cannot read the config of {directory!r}: {error}", EXIT_USAGE) from error
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    if method != "fwsvd":
        raise CommandError(f"{directory!r} is not an FWSVD checkpoint; it is already dense.", EXIT_USAGE)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise CommandError(f"{directory!r} names architecture {architecture!r}, which transformers does not have.")
    return model_class


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from ..api import decompress

    if args.directory.startswith((".", os.sep, "~")) and not os.path.exists(args.directory):
        raise CommandError(f"DIR {args.directory!r} does not exist.", EXIT_USAGE)
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise CommandError(f"OUT {args.output!r} is not empty; pass --overwrite or choose another folder.", EXIT_USAGE)
    check_output_path(args.output, [args.directory], "OUT", args.overwrite)
    model_class = _model_class(args.directory)
    try:
        model = model_class.from_pretrained(args.directory)
    except (OSError, ValueError) as error:
        raise CommandError(f"Cannot load the checkpoint {args.directory!r}: {error}") from error
    compressed_params = count_parameters(model)
    decompress(model, getattr(torch, args.dtype) if args.dtype else None)
    model.save_pretrained(args.output)
    try:
        AutoTokenizer.from_pretrained(args.directory).save_pretrained(args.output)
        tokenizer_note = "with its tokenizer"
    except (OSError, ValueError):
        tokenizer_note = "no tokenizer found to copy"
    with open(os.path.join(args.output, "config.json"), encoding="utf-8") as handle:
        if "quantization_config" in json.load(handle):
            raise CommandError(f"The export in {args.output!r} still has a quantization_config; please report this.")
    print(
        f"Wrote a dense {type(model).__name__} to {args.output} ({tokenizer_note}): {count_parameters(model):,} "
        f"parameters (the compressed checkpoint has {compressed_params:,}). It loads with plain transformers."
    )
    return 0
