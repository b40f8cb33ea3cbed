"""Accuracy cost and speed gain of `FWSVDConfig(rank_multiple=...)` on the MiniLM polarity task model.

At one rank ratio (default 0.33, rank 127 on every MiniLM layer) the task model is compressed with FWSVD without
rounding and with ranks rounded down to multiples of 8 and 16 (120 and 112). The Fisher comes once from the
training split (`importances_cache`), so the variants differ only in their ranks. Reported: dev accuracy (800
sentences never used for calibration), parameters kept, and the forward time of the whole model and of each layer
shape, timed side by side (interleaved, median of per-repetition ratios after warm-up).

Run: ``PYTHONPATH=src:. python benchmarks/rank_rounding.py --threads 1``
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import torch

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side

MULTIPLES = (None, 8, 16)
SEQ_LEN = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank-ratio", type=float, default=0.33)
    parser.add_argument("--num-samples", type=int, default=256, help="calibration sentences (training split)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.assets import polarity_splits
    from benchmarks.task_model import build_task_model
    from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
    from hf_fwsvd.evaluation import evaluate_classifier

    print(f"# Rank rounding on the MiniLM polarity task model\n\n{machine_line()}\n")
    task_dir = build_task_model()
    splits = polarity_splits()
    tokenizer = AutoTokenizer.from_pretrained(task_dir)
    dense = AutoModelForSequenceClassification.from_pretrained(task_dir).eval()
    models, rows = {"dense": dense}, []
    dense_accuracy = evaluate_classifier(dense, tokenizer, splits["dev"])["accuracy"]
    rows.append(["dense", "-", "1.0000", f"{dense_accuracy:.4f}"])
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "importances.safetensors")
        for multiple in MULTIPLES:
            config = FWSVDConfig(
                rank_ratio=args.rank_ratio, rank_multiple=multiple, calibration_dataset=splits["train"],
                tokenizer=tokenizer, num_samples=args.num_samples, batch_size=16, max_length=64,
                importances_cache=cache,
            )  # fmt: skip
            model = compress(AutoModelForSequenceClassification.from_pretrained(task_dir).eval(), config)
            ranks = sorted(set(model.config.quantization_config.ranks.values()))
            accuracy = evaluate_classifier(model, tokenizer, splits["dev"])["accuracy"]
            label = f"rank_multiple={multiple}"
            rows.append([label, ranks, f"{model.fwsvd_report.params_ratio:.4f}", f"{accuracy:.4f}"])
            models[label] = model
    print(f"Rank ratio {args.rank_ratio}, FWSVD, Fisher from {args.num_samples} training sentences:\n")
    print(markdown_table(["variant", "ranks", "params kept", "dev accuracy"], rows) + "\n")

    speed_rows = []
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        inputs = {"input_ids": torch.randint(1000, 20000, (batch, SEQ_LEN), generator=generator)}
        with torch.inference_mode():
            variants = {name: (lambda m=m, inputs=inputs: m(**inputs)) for name, m in models.items()}
            times = time_side_by_side(variants, repeats=args.repeats, min_time=0.0)
        base = f"rank_multiple={MULTIPLES[0]}"
        for name in models:
            speed_rows.append(
                [f"whole model, batch {batch}", name, f"{times[name] * 1e3:.1f}",
                 f"{times.speedup('dense', name):.2f}", f"{times.speedup(base, name):.3f}"]
            )  # fmt: skip
    layer_ranks = sorted({rank for row in rows[1:] for rank in row[1]}, reverse=True)
    for out_features, in_features in ((384, 384), (1536, 384), (384, 1536)):
        dense_layer = torch.nn.Linear(in_features, out_features)
        layers = {rank: LowRankLinear(in_features, out_features, rank) for rank in layer_ranks}
        x = torch.randn(8, SEQ_LEN, in_features)
        with torch.inference_mode():
            variants = {"dense": lambda d=dense_layer, x=x: d(x)}
            variants.update({r: (lambda m=m, x=x: m(x)) for r, m in layers.items()})
            times = time_side_by_side(variants, repeats=args.repeats)
        for rank in layer_ranks:
            speed_rows.append(
                [f"{out_features}x{in_features}, batch 8", f"rank {rank}", f"{times[rank] * 1e3:.2f}",
                 f"{times.speedup('dense', rank):.2f}", f"{times.speedup(layer_ranks[0], rank):.3f}"]
            )  # fmt: skip
    print(f"Forward time, seq len {SEQ_LEN} (speed-ups are medians of paired ratios):\n")
    headers = ["what", "variant", "ms", "vs dense", "vs unrounded"]
    print(markdown_table(headers, speed_rows) + "\n")
    print(f"finished: {machine_line()}")


if __name__ == "__main__":
    main()
