"""Inference speed: dense vs low-rank forward, per MiniLM layer shape and for the whole model, against the FLOP limit.

For every LowRankLinear shape of all-MiniLM-L6-v2 (384x384, 1536x384, 384x1536) and for the whole model, at rank
ratios 0.1/0.25/0.33/0.5, batch sizes 1/8/32 and sequence length 128, in fp32 and bf16 on CPU: time the dense and
the low-rank forward side by side and print the achieved speed-up, the FLOP-ratio speed-up (the limit) and their
ratio (the efficiency). The pay-off rule of `hf_fwsvd.payoff` is printed next to what was measured.

Run: ``PYTHONPATH=src:. python benchmarks/inference.py --threads 1``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side
from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.payoff import DEFAULT_EFFICIENCY, flop_ratio, low_rank_pays_off

RATIOS = (0.1, 0.25, 0.33, 0.5)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ_LEN = 128


def load_minilm() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    from benchmarks.assets import minilm_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()


def layer_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Distinct ``(out, in)`` shapes of the linear layers FWSVD compresses in `model`."""
    from hf_fwsvd.replace import shape_of
    from hf_fwsvd.targets import find_target_modules

    return sorted({shape_of(module) for module in find_target_modules(model, FWSVDConfig()).values()})


def bench_layers(shapes, batches, dtypes, repeats) -> tuple[list[list[object]], list[tuple]]:
    rows, records = [], []
    for out_features, in_features in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            dense = torch.nn.Linear(in_features, out_features).to(dtype)
            ranks = {ratio: max(1, round(ratio * min(out_features, in_features))) for ratio in RATIOS}
            low = {ratio: LowRankLinear(in_features, out_features, rank).to(dtype) for ratio, rank in ranks.items()}
            for batch in batches:
                x = torch.randn(batch, SEQ_LEN, in_features, dtype=dtype)
                with torch.inference_mode():
                    variants = {"dense": lambda dense=dense, x=x: dense(x)}
                    variants.update({ratio: (lambda m=m, x=x: m(x)) for ratio, m in low.items()})
                    times = time_side_by_side(variants, repeats=repeats)
                for ratio, rank in ranks.items():
                    achieved = times.speedup("dense", ratio)
                    limit = 1 / flop_ratio(out_features, in_features, rank)
                    rule = "yes" if low_rank_pays_off(out_features, in_features, rank) else "no"
                    rows.append(
                        [
                            f"{out_features}x{in_features}", dtype_name, batch, ratio, rank,
                            f"{times['dense'] * 1e3:.2f}", f"{times[ratio] * 1e3:.2f}", f"{achieved:.2f}",
                            f"{limit:.2f}", f"{achieved / limit:.2f}", rule, "yes" if achieved > 1 else "no",
                        ]
                    )  # fmt: skip
                    records.append((dtype_name, batch, limit, achieved))
    return rows, records


def matmul_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs)
    return counter.get_total_flops()


def bench_model(dense: torch.nn.Module, batches, dtypes, repeats) -> tuple[list[list[object]], list[tuple]]:
    compressed = {}
    for ratio in RATIOS:
        model = copy.deepcopy(dense)
        compress(model, FWSVDConfig(rank_ratio=ratio, method="svd"), show_progress=False)
        compressed[ratio] = model
    rows, records = [], []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        models = {"dense": dense.to(dtype), **{ratio: model.to(dtype) for ratio, model in compressed.items()}}
        for batch in batches:
            generator = torch.Generator().manual_seed(batch)
            inputs = {"input_ids": torch.randint(1000, 20000, (batch, SEQ_LEN), generator=generator)}
            flops = {name: matmul_flops(model, inputs) for name, model in models.items()}
            with torch.inference_mode():
                variants = {name: (lambda m=model, inputs=inputs: m(**inputs)) for name, model in models.items()}
                times = time_side_by_side(variants, repeats=repeats, min_time=0.0)
            for ratio in RATIOS:
                achieved = times.speedup("dense", ratio)
                limit = flops["dense"] / flops[ratio]
                rows.append(
                    [
                        dtype_name, batch, ratio, f"{times['dense'] * 1e3:.1f}", f"{times[ratio] * 1e3:.1f}",
                        f"{achieved:.2f}", f"{limit:.2f}", f"{achieved / limit:.2f}",
                    ]
                )  # fmt: skip
                records.append((dtype_name, batch, limit, achieved))
    return rows, records


def summary(records: list[tuple]) -> list[list[object]]:
    """Median efficiency (achieved / limit) per dtype and batch, over the rows whose limit is above 1."""
    rows = []
    for dtype_name in sorted({r[0] for r in records}):
        for batch in sorted({r[1] for r in records}):
            eff = [a / lim for d, b, lim, a in records if d == dtype_name and b == batch and lim > 1]
            if eff:
                rows.append([dtype_name, batch, len(eff), f"{statistics.median(eff):.2f}", f"{min(eff):.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=11, help="timed repetitions per layer variant")
    parser.add_argument("--model-repeats", type=int, default=5, help="timed repetitions per whole-model variant")
    parser.add_argument("--skip-model", action="store_true", help="per-layer table only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    set_threads(args.threads)
    torch.manual_seed(0)
    dense = load_minilm()
    shapes = layer_shapes(dense)
    print(f"# Inference: dense vs low-rank forward, seq len {SEQ_LEN}\n\n{machine_line()}\n")
    rows, records = bench_layers(shapes, args.batches, args.dtypes, args.repeats)
    headers = ["shape (out x in)", "dtype", "batch", "ratio", "rank", "dense ms", "low-rank ms", "speed-up",
               "FLOP limit", "achieved/limit", f"rule (eff {DEFAULT_EFFICIENCY}) pays", "measured faster"]  # fmt: skip
    print("## Per layer\n\n" + markdown_table(headers, rows) + "\n")
    print("Median and worst achieved/limit over rows with limit > 1:\n")
    print(markdown_table(["dtype", "batch", "rows", "median", "min"], summary(records)) + "\n")
    if not args.skip_model:
        rows, records = bench_model(dense, args.batches, args.dtypes, args.model_repeats)
        headers = ["dtype", "batch", "ratio", "dense ms", "low-rank ms", "speed-up", "FLOP limit", "achieved/limit"]
        print("## Whole model (all-MiniLM-L6-v2 + classifier head; limit = matmul FLOPs incl. attention)\n")
        print(markdown_table(headers, rows) + "\n")
    print(f"finished: {machine_line()}")


if __name__ == "__main__":
    main()
