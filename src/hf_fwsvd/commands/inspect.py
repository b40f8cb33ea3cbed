"""`hf-fwsvd inspect`: rank map, sizes and compression ratio of a saved checkpoint, from file headers only."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from .common import EXIT_USAGE, CommandError

__all__ = ["add_parser", "inspect_checkpoint", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="Show the rank map, sizes and compression ratio of a saved checkpoint.",
        description="Reads config.json and the safetensors headers (tensor names, shapes, dtypes); no weights "
        "are loaded, so it is instant even for large checkpoints.",
    )
    parser.add_argument("directory", metavar="DIR", help="A folder written by save_pretrained of a compressed model.")
    parser.add_argument("--json", action="store_true", help="Print the summary as one JSON object.")
    parser.set_defaults(run=run)
    return parser


def _weight_files(directory: str, weights_file: str) -> list[str]:
    path = os.path.join(directory, weights_file)
    if not os.path.isfile(path):
        raise CommandError(f"{directory!r} names weights file {weights_file!r} in config.json, but it is missing.")
    if weights_file.endswith(".index.json"):
        from ..checkpoint_checks import _read_index

        try:
            return sorted(set(_read_index(directory, weights_file, directory).values()))
        except ValueError as error:
            raise CommandError(str(error)) from error
    return [weights_file]


def _tensor_shapes(directory: str, files: list[str]) -> tuple[dict[str, list[int]], dict[str, int]]:
    from safetensors import SafetensorError, safe_open

    shapes, dtypes = {}, {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CommandError(f"Weights shard {path!r} is missing; the checkpoint is incomplete.")
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    tensor = handle.get_slice(key)
                    shapes[key] = list(tensor.get_shape())
                    dtypes[tensor.get_dtype()] = dtypes.get(tensor.get_dtype(), 0) + 1
        except (SafetensorError, OSError, ValueError) as error:
            raise CommandError(
                f"Weights file {path!r} is not a valid safetensors file ({error}): it is truncated or corrupt. "
                "Download or copy it again, or re-save the checkpoint."
            ) from error
    return shapes, dtypes


def _natural_key(name: str) -> list[Any]:
    """Sort key putting `layer.2` before `layer.10` (config.json stores the rank map sorted as text)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def inspect_checkpoint(directory: str) -> dict[str, Any]:
    """Summary of an FWSVD checkpoint: per-module shapes and ranks, stored and dense-equivalent parameter counts.

    Raises:
        `CommandError`: When `directory` is not an FWSVD checkpoint (exit code 2) or is incomplete.
    """
    config_path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise CommandError(f"{directory!r} is not a folder.", EXIT_USAGE)
    if not os.path.isfile(config_path):
        raise CommandError(f"{directory!r} has no config.json; it is not a saved model.", EXIT_USAGE)
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise CommandError(
            f"{config_path!r} is not readable JSON ({error}): restore it from the original checkpoint."
        ) from error
    if not isinstance(config, dict):
        raise CommandError(f"{config_path!r} holds a {type(config).__name__}, not a model config object.")
    quantization = config.get("quantization_config") or {}
    if not isinstance(quantization, dict) or not isinstance(quantization.get("ranks", {}), dict):
        raise CommandError(f"{config_path!r} has a malformed `quantization_config`; re-save the checkpoint.")
    if quantization.get("quant_method") != "fwsvd" or not quantization.get("ranks"):
        raise CommandError(
            f"{directory!r} is not an FWSVD checkpoint (config.json has no fwsvd quantization_config with a rank "
            "map). Compress it first with `hf-fwsvd compress`.",
            EXIT_USAGE,
        )
    files = _weight_files(directory, quantization.get("weights_file") or "model.fwsvd.safetensors")
    shapes, dtypes = _tensor_shapes(directory, files)
    modules = []
    for name, rank in sorted(quantization["ranks"].items(), key=lambda item: _natural_key(item[0])):
        down, up = shapes.get(f"{name}.down.weight"), shapes.get(f"{name}.up.weight")
        if down is None or up is None:
            raise CommandError(f"The rank map names {name!r} but the weights have no {name}.down/up tensors.")
        in_features, out_features = down[1], up[0]
        if down[0] != rank or up[1] != rank:
            raise CommandError(f"{name!r} has rank {rank} in config.json but factors {down} / {up} in the weights.")
        modules.append(
            {
                "name": name,
                "shape": [out_features, in_features],
                "rank": rank,
                "params_before": out_features * in_features,
                "params_after": rank * (in_features + out_features),
            }
        )
    stored = sum(_numel(shape) for shape in shapes.values())
    dense = stored + sum(row["params_before"] - row["params_after"] for row in modules)
    setting = {key: quantization.get(key) for key in ("rank", "rank_ratio", "param_ratio") if quantization.get(key)}
    return {
        "directory": directory,
        "architecture": (config.get("architectures") or ["unknown"])[0],
        "method": quantization.get("method", "fwsvd"),
        "setting": setting,
        "rank_pattern": quantization.get("rank_pattern") or {},
        "base_model": quantization.get("base_model"),
        "hf_fwsvd_version": quantization.get("hf_fwsvd_version"),
        "weight_files": files,
        "weight_bytes": sum(os.path.getsize(os.path.join(directory, name)) for name in files),
        "dtypes": dtypes,
        "parameters": stored,
        "dense_parameters": dense,
        "params_ratio": stored / max(dense, 1),
        "compression_ratio": dense / max(stored, 1),
        "modules": modules,
    }


def _print(summary: dict[str, Any]) -> None:
    setting = ", ".join(f"{key}={value}" for key, value in summary["setting"].items()) or "explicit ranks"
    if summary["rank_pattern"]:
        setting += f", rank_pattern={summary['rank_pattern']}"
    dtypes = ", ".join(sorted(summary["dtypes"]))
    print(f"{'checkpoint':<14} {summary['directory']}")
    print(f"{'architecture':<14} {summary['architecture']}")
    print(f"{'method':<14} {summary['method']} ({setting})")
    print(f"{'base model':<14} {summary['base_model'] or 'not recorded'}")
    print(f"{'written by':<14} hf_fwsvd {summary['hf_fwsvd_version']}")
    size = summary["weight_bytes"] / 2**20
    print(f"{'weights':<14} {', '.join(summary['weight_files'])} ({size:.1f} MiB, {dtypes})")
    print(
        f"{'parameters':<14} {summary['parameters']:,} stored, {summary['dense_parameters']:,} dense "
        f"({summary['params_ratio']:.1%} kept, compression {summary['compression_ratio']:.2f}x)"
    )
    before = sum(row["params_before"] for row in summary["modules"])
    after = sum(row["params_after"] for row in summary["modules"])
    print(
        f"{'low-rank':<14} {len(summary['modules'])} modules, {before:,} -> {after:,} weights "
        f"({after / max(before, 1):.1%} kept)"
    )
    print()
    width = max(len("module"), *(len(row["name"]) for row in summary["modules"]))
    print(f"{'module':<{width}} {'shape':>11} {'rank':>5} {'dense':>10} {'low-rank':>10} {'kept':>6}")
    for row in summary["modules"]:
        shape = f"{row['shape'][0]}x{row['shape'][1]}"
        kept = row["params_after"] / row["params_before"]
        print(
            f"{row['name']:<{width}} {shape:>11} {row['rank']:>5} {row['params_before']:>10,} "
            f"{row['params_after']:>10,} {kept:>6.1%}"
        )


def run(args: argparse.Namespace) -> int:
    summary = inspect_checkpoint(args.directory)
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary)
    return 0
