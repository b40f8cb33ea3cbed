"""Fisher estimation cost: time per sample and peak extra memory vs a plain forward+backward on the same batches.

Model: all-MiniLM-L6-v2 with a 2-class head; data: Pang & Lee sentence polarity (real sentences), batch size 8,
tokenised with the model's tokenizer. Two workloads: the sentences as they are (dynamic padding, ~20-60 tokens), and
"long" batches of several sentences joined and truncated to 128 tokens. Variants, timed side by side:

- ``fwd+bwd``: a plain training-style step (parameters require grad, ``loss.backward()``, grads dropped);
- ``frozen-bwd``: the backward Fisher estimation needs, without its hooks (parameters frozen, gradient taken w.r.t.
  the input embeddings): what any hook-based estimator has to pay;
- ``fisher``: `hf_fwsvd.estimate_fisher` as shipped (batched per-example sums, ``auto`` form);
- ``fisher-direct``: the ``out x in`` form forced (``auto`` picks the Gram form at these lengths);
- ``fisher-loop``: the previous implementation (one ``out x in`` matmul per example in a Python loop).

Peak extra memory is the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the pass, measured
in a fresh subprocess per variant (tracemalloc does not see torch's allocator), against the model's size.

Run: ``PYTHONPATH=src:. python benchmarks/fisher_speed.py --threads 1``
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import subprocess
import sys

import torch

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side
from hf_fwsvd import fisher
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.fisher import estimate_fisher, model_loss
from hf_fwsvd.targets import find_target_modules

BATCH_SIZE = 8
VARIANTS = ("fwd+bwd", "frozen-bwd", "fisher", "fisher-direct", "fisher-loop")


def _loop_sums(inputs: torch.Tensor, grads: torch.Tensor, **_: object) -> torch.Tensor:
    """The previous implementation: one ``out x in`` weight gradient per example, in a Python loop."""
    total = torch.zeros(inputs.shape[-1], dtype=torch.float32)
    for example_in, example_grad in zip(inputs, grads, strict=True):
        total += (example_grad.T @ example_in).square().sum(0)
    return total


_ORIGINAL_SUMS = fisher.per_example_squared_sums
_SUMS = {
    "fisher": _ORIGINAL_SUMS,
    "fisher-direct": functools.partial(_ORIGINAL_SUMS, method="direct"),
    "fisher-loop": _loop_sums,
}


def load(samples: int, long: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.assets import minilm_dir, polarity_splits
    from hf_fwsvd import FWSVDConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    records = polarity_splits()["train"]
    if long:  # join consecutive sentences until each example is past 128 tokens
        records = [
            {"text": " ".join(r["text"] for r in records[i * 8 : i * 8 + 8]), "label": records[i * 8]["label"]}
            for i in range(samples)
        ]
    loader = build_calibration_loader(
        records[:samples], tokenizer, model, num_samples=samples, batch_size=BATCH_SIZE, max_length=128
    )
    batches = list(loader)
    targets = find_target_modules(model, FWSVDConfig())
    return model, batches, targets


def run_variant(name: str, model, batches, targets) -> None:
    if name == "fwd+bwd":
        for param in model.parameters():
            param.requires_grad_(True)
        for batch in batches:
            model_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
        return
    if name == "frozen-bwd":
        for param in model.parameters():
            param.requires_grad_(False)
        embed = model.get_input_embeddings()
        for batch in batches:
            embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
            inputs = {key: value for key, value in batch.items() if key != "input_ids"}
            torch.autograd.grad(model(inputs_embeds=embeds, **inputs).loss, embeds)
        return
    fisher.per_example_squared_sums = _SUMS[name]
    try:
        estimate_fisher(model, batches, targets, show_progress=False)
    finally:
        fisher.per_example_squared_sums = _ORIGINAL_SUMS


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def memory_child(name: str, samples: int, long: bool) -> None:
    model, batches, targets = load(samples, long)
    run_variant(name, model, batches[:1], targets)  # warm-up: allocator pools, lazy init
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    run_variant(name, model, batches, targets)
    print(json.dumps({"extra_kib": _rss_kib("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--long", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    set_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.samples, args.long)
        return
    print(f"# Fisher estimation vs plain forward+backward (batch {BATCH_SIZE})\n\n{machine_line()}\n")
    rows, memory_rows = [], []
    for long in (False, True):
        model, batches, targets = load(args.samples, long)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches) / args.samples
        padded = sum(b["input_ids"].numel() for b in batches) / args.samples
        workload = f"{'long' if long else 'sentences'} ({tokens:.0f} tok, {padded:.0f} padded)"
        variants = {name: functools.partial(run_variant, name, model, batches, targets) for name in VARIANTS}
        times = time_side_by_side(variants, repeats=args.repeats, min_time=0.0)
        for name in VARIANTS:
            rows.append(
                [
                    workload, name, f"{times[name] / args.samples * 1e3:.2f}",
                    f"{times.speedup(name, 'fwd+bwd'):.2f}",
                ]
            )  # fmt: skip
        if not args.skip_memory:
            size_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            in_sum = sum(module.in_features for module in targets.values())
            for name in ("fwd+bwd", "frozen-bwd", "fisher", "fisher-loop"):
                command = [sys.executable, __file__, "--memory-child", name, "--samples", str(args.samples)]
                command += ["--threads", str(args.threads)] + (["--long"] if long else [])
                out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ).stdout
                extra = json.loads(out.strip().splitlines()[-1])["extra_kib"] / 1024
                memory_rows.append([workload, name, f"{extra:.1f}", f"{extra / size_mib:.2f}"])
            memory_rows.append([workload, f"(model {size_mib:.1f} MiB; sum of in_features {in_sum})", "", ""])
    print(markdown_table(["workload", "variant", "ms / sample", "time vs fwd+bwd"], rows) + "\n")
    if memory_rows:
        print("Peak extra RSS during the pass (MiB), and as a fraction of the model's parameter bytes:\n")
        print(markdown_table(["workload", "variant", "peak extra MiB", "x model size"], memory_rows) + "\n")
    print(f"finished: {machine_line()}")


if __name__ == "__main__":
    main()
