"""Checkpoint size, reload time and load memory of compressed all-MiniLM-L6-v2 vs the dense model.

1. Checkpoint bytes (the weights file) vs the parameter ratio, at rank ratios 0.1/0.25/0.33/0.5 (fp32).
2. Reload time of each compressed checkpoint vs the dense one (`from_pretrained`, side by side, median).
3. Peak RSS of a plain dense load, of compress-on-load (``fwsvd_config=`` with 32 Pang & Lee sentences) and of
   reloading a compressed checkpoint, each in a fresh subprocess (peak minus the RSS after imports).

Run: ``PYTHONPATH=src:. python benchmarks/load_size.py --threads 1``; ``--model smollm2`` times the reload of
SmolLM2-135M (210 compressed modules, plain SVD at the given ``--ratios``) instead, without the memory table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side

RATIOS = (0.1, 0.25, 0.33, 0.5)


def _kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def _read_all(model: torch.nn.Module) -> float:
    return float(sum(param.detach().float().sum() for param in model.parameters()))


def memory_child(mode: str, path: str) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.assets import polarity_splits
    from hf_fwsvd import FWSVDConfig

    kwargs = {}
    if mode == "compress-on-load":
        tokenizer = AutoTokenizer.from_pretrained(path)
        data = polarity_splits()["train"][:32]
        kwargs["fwsvd_config"] = FWSVDConfig(rank_ratio=0.25, calibration_dataset=data, tokenizer=tokenizer)
    before = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak RSS (VmHWM)
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **kwargs)
    print(json.dumps({"peak_extra_kib": _kib("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--memory-child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.assets import minilm_dir, smollm2_dir
    from hf_fwsvd import FWSVDConfig, compress

    print(f"# Checkpoint size, reload time and load memory ({args.model})\n\n{machine_line()}\n")
    torch.manual_seed(0)
    if args.model == "smollm2":
        source, model_class, extra = smollm2_dir(), AutoModelForCausalLM, {"dtype": torch.float32}
    else:
        source, model_class, extra = minilm_dir(), AutoModelForSequenceClassification, {"num_labels": 2}
    dense = model_class.from_pretrained(source, **extra).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense.save_pretrained(root / "dense")
        tokenizer.save_pretrained(root / "dense")
        dense_bytes = (root / "dense" / "model.safetensors").stat().st_size
        size_rows, loaders = [], {"dense": lambda: model_class.from_pretrained(root / "dense")}
        for ratio in args.ratios:
            model = compress(copy.deepcopy(dense), FWSVDConfig(rank_ratio=ratio, method="svd"), show_progress=False)
            path = root / f"r{ratio}"
            model.save_pretrained(path)
            size = (path / "model.fwsvd.safetensors").stat().st_size
            param_ratio = model.fwsvd_report.params_ratio
            size_rows.append(
                [ratio, f"{param_ratio:.4f}", f"{size / 1e6:.2f}", f"{size / dense_bytes:.4f}",
                 f"{100 * (size / dense_bytes / param_ratio - 1):+.2f}%"]
            )  # fmt: skip
            loaders[ratio] = lambda path=path: model_class.from_pretrained(path)
        print(f"Dense weights file: {dense_bytes / 1e6:.2f} MB\n")
        headers = ["rank ratio", "param ratio", "weights MB", "bytes ratio", "bytes vs params"]
        print(markdown_table(headers, size_rows) + "\n")

        # safetensors maps the file lazily: a plain load may not read the weights at all, so also time a load that
        # reads every parameter once (what the first forward pass does anyway).
        touched = {f"{name}+read": (lambda load=load: _read_all(load())) for name, load in loaders.items()}
        times = time_side_by_side({**loaders, **touched}, repeats=args.repeats, min_time=0)
        rows = [
            [name, f"{times[name] * 1e3:.0f}", f"{1 / times.speedup('dense', name):.2f}",
             f"{times[f'{name}+read'] * 1e3:.0f}", f"{1 / times.speedup('dense+read', f'{name}+read'):.2f}"]
            for name in loaders
        ]  # fmt: skip
        print("Reload time (`from_pretrained`, median; then the same plus reading every parameter once):\n")
        headers = ["checkpoint", "load ms", "vs dense", "load+read ms", "vs dense"]
        print(markdown_table(headers, rows) + "\n")

        if args.model != "minilm":
            print(f"finished: {machine_line()}")
            return
        memory_rows = []
        for mode, path in [
            ("dense load", root / "dense"),
            ("compress-on-load (rank ratio 0.25, 32 samples)", root / "dense"),
            ("reload compressed (rank ratio 0.25)", root / "r0.25"),
        ]:
            child_mode = "compress-on-load" if mode.startswith("compress") else "load"
            command = [sys.executable, __file__, "--memory-child", child_mode, str(path)]
            command += ["--threads", str(args.threads)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ).stdout
            memory_rows.append([mode, json.loads(out.strip().splitlines()[-1])["peak_extra_kib"] / 1024])
        base = memory_rows[0][1]
        memory_rows = [[mode, f"{mib:.0f}", f"{mib / base:.2f}"] for mode, mib in memory_rows]
        print("Peak RSS above the process's RSS after imports (MiB):\n")
        print(markdown_table(["load", "peak extra MiB", "vs dense load"], memory_rows) + "\n")
    print(f"finished: {machine_line()}")


if __name__ == "__main__":
    main()
