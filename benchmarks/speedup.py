"""Whole-model speed-up of a compressed MiniLM task model against dense fp32 and dense int8, eager and compiled.

Variants (all CPU, seq len 128, batch 1 and 8, timed side by side: interleaved repetitions, medians of the paired
ratios to dense fp32 after warm-up):

- ``dense fp32``; ``dense dynamic int8`` (`torch.ao.quantization.quantize_dynamic`, int8 weights and per-batch int8
  activations through fbgemm); ``dense + compile`` (`torch.compile`, inductor);
- ``compressed fp32`` (FWSVD at ``--rank-ratio``); ``compressed + compile``;
- ``compressed, int8 factors`` (torchao `Int8WeightOnlyConfig` on the two factors of every `LowRankLinear`) and the
  same ``+ compile``; ``compressed + dynamic int8`` (`quantize_dynamic` on the factors).

Dev accuracy (800 sentences never used for calibration) is given for the eager variants; a compiled model computes
the same function as its eager one.

Run: ``PYTHONPATH=src:. python benchmarks/speedup.py --threads 1``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
import warnings

import torch

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side

SEQ_LEN = 128


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """int8 weights and dynamically quantised int8 activations for every `nn.Linear` (factors included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def int8_factors(model: torch.nn.Module) -> torch.nn.Module:
    """torchao int8 weight-only quantisation of the factors of every `LowRankLinear` (other layers stay fp32)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from hf_fwsvd import LowRankLinear

    factors = {
        f"{name}.{part}"
        for name, module in model.named_modules()
        if isinstance(module, LowRankLinear)
        for part in ("down", "up")
    }
    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in factors)
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--num-samples", type=int, default=256, help="calibration sentences (training split)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.assets import polarity_splits
    from benchmarks.task_model import build_task_model
    from hf_fwsvd import FWSVDConfig, compress
    from hf_fwsvd.evaluation import evaluate_classifier

    print(f"# Whole-model speed-up: compressed vs dense, eager, compiled and int8\n\n{machine_line()}\n")
    task_dir = build_task_model()
    splits = polarity_splits()
    tokenizer = AutoTokenizer.from_pretrained(task_dir)
    dense = AutoModelForSequenceClassification.from_pretrained(task_dir).eval()
    config = FWSVDConfig(
        rank_ratio=args.rank_ratio, calibration_dataset=splits["train"], tokenizer=tokenizer,
        num_samples=args.num_samples, batch_size=16, max_length=64,
    )  # fmt: skip
    compressed = compress(copy.deepcopy(dense), config, show_progress=False)
    eager = {
        "dense fp32": dense,
        "dense dynamic int8": dynamic_int8(dense),
        "compressed fp32": compressed,
        "compressed, int8 factors (torchao weight-only)": int8_factors(compressed),
        "compressed + dynamic int8": dynamic_int8(compressed),
    }
    accuracy = {name: evaluate_classifier(m, tokenizer, splits["dev"])["accuracy"] for name, m in eager.items()}
    compiled = {}
    if not args.no_compile:
        for name in ("dense fp32", "compressed fp32", "compressed, int8 factors (torchao weight-only)"):
            compiled[name.replace(" fp32", "") + " + compile"] = torch.compile(eager[name], dynamic=False)
    models = {**eager, **compiled}
    ranks = sorted(set(compressed.config.quantization_config.ranks.values()))
    print(f"Compressed: FWSVD at rank ratio {args.rank_ratio} (ranks {ranks}), params kept "
          f"{compressed.fwsvd_report.params_ratio:.4f} of the whole model.\n")  # fmt: skip
    rows = {name: [name, f"{accuracy[name]:.4f}" if name in accuracy else "(= eager)"] for name in models}
    headers = ["variant", "dev accuracy"]
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        inputs = {"input_ids": torch.randint(1000, 20000, (batch, SEQ_LEN), generator=generator)}
        with torch.inference_mode():
            for name, model in compiled.items():
                start = time.perf_counter()
                model(**inputs)
                print(f"compiled `{name}` for batch {batch} in {time.perf_counter() - start:.0f} s")
            variants = {name: (lambda m=model, inputs=inputs: m(**inputs)) for name, model in models.items()}
            times = time_side_by_side(variants, repeats=args.repeats, min_time=0.0)
        for name in models:
            rows[name] += [f"{times[name] * 1e3:.1f}", f"{times.speedup('dense fp32', name):.2f}x"]
        headers += [f"batch {batch} ms", f"batch {batch} vs dense fp32"]
    print(f"\nForward of {SEQ_LEN} tokens per sequence:\n")
    print(markdown_table(headers, list(rows.values())) + "\n")
    print(f"finished: {machine_line()}")


if __name__ == "__main__":
    main()
