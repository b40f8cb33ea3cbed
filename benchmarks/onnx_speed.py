"""ONNX Runtime speed of the compressed MiniLM classifier against the dense model's ONNX export.

Both models are exported with `hf_fwsvd.onnx_export.export_onnx` (torch.onnx dynamo exporter) and run in
onnxruntime on CPU with one intra-op thread, timed side by side (interleaved repetitions, medians, paired ratios;
`perf_common.time_side_by_side`). The compressed models use plain SVD at the given rank ratios: the speed depends
on the ranks only, not on how the factors were chosen. Each export is also checked against PyTorch on a
different batch (the max abs difference of the logits is printed).

Run: ``PYTHONPATH=src:. python benchmarks/onnx_speed.py`` (about 2 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.perf_common import machine_line, markdown_table, set_threads, time_side_by_side
from benchmarks.task_model import build_task_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.5,0.33,0.25", help="Rank ratios of the compressed models.")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="Batch sizes.")
    parser.add_argument("--length", type=int, default=128, help="Sequence length.")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_threads(1)

    import onnxruntime
    from transformers import AutoModelForSequenceClassification

    import hf_fwsvd
    from hf_fwsvd.onnx_export import export_onnx

    path = build_task_model()
    ratios = [float(value) for value in args.ratios.split(",")]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sessions, checks, sizes = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in ["dense"] + [f"svd {ratio:g}" for ratio in ratios]:
            model = AutoModelForSequenceClassification.from_pretrained(path)
            if name != "dense":
                ratio = float(name.split()[1])
                hf_fwsvd.compress(model, hf_fwsvd.FWSVDConfig(rank_ratio=ratio, method="svd"), show_progress=False)
            result = export_onnx(model, os.path.join(scratch, name.replace(" ", "-")))
            checks[name] = result.max_abs_diff
            sizes[name] = os.path.getsize(result.path) / 2**20
            sessions[name] = onnxruntime.InferenceSession(result.path, options, providers=["CPUExecutionProvider"])
        rows = []
        for batch in args.batch:
            generator = torch.Generator().manual_seed(batch)
            feeds = {
                "input_ids": torch.randint(1000, 20000, (batch, args.length), generator=generator).numpy(),
                "attention_mask": torch.ones(batch, args.length, dtype=torch.long).numpy(),
            }
            timings = time_side_by_side(
                {name: (lambda s=session, f=feeds: s.run(None, f)) for name, session in sessions.items()},
                repeats=args.repeats,
            )
            for name in sessions:
                rows.append(
                    [
                        name,
                        batch,
                        f"{sizes[name]:.1f}",
                        f"{1000 * timings[name]:.1f}",
                        "1.00" if name == "dense" else f"{timings.speedup('dense', name):.2f}",
                        f"{checks[name]:.1e}",
                    ]
                )
    print(machine_line())
    print(
        f"MiniLM polarity classifier ({path.name}), sequence length {args.length}, onnxruntime "
        f"{onnxruntime.__version__}, 1 thread\n"
    )
    headers = ["model", "batch", "ONNX MiB", "ms / batch", "speed-up vs dense ONNX", "max abs diff vs PyTorch"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
