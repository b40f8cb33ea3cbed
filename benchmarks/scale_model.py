"""Cost model of compressing a Llama: measure small synthetic Llamas, fit time and memory, predict 7B and 70B.

For each size (``--hiddens``; intermediate size 8/3 of the hidden size rounded to 64, ``--layers`` blocks, head size
64) a fresh process builds a random-weight ``LlamaForCausalLM`` checkpoint and measures, with one torch thread:

- ``fisher_s``: the Fisher pass (`compute_importances` on ``--samples`` random sequences of ``--seq-len`` tokens);
- ``factorise_s``: `compress_layerwise` with those importances at rank ratio 0.33 and ``svd_solver="full"`` (the
  solver `"auto"` picks at that ratio), block by block from disk;
- peak RSS above the import floor of each phase (``VmHWM``, reset between phases through ``/proc/self/clear_refs``).

The fits (least squares, relative errors) are:

- ``fisher_s = a * F + a0`` with ``F = 6 * tokens * block_params`` (forward + backward matmul FLOPs of the blocks);
- ``factorise_s = b * S + c * n_matrices`` with ``S = sum(m * n * min(m, n))`` over the factorised matrices (the
  cost of a full SVD);
- ``fisher_peak = w * weights + d * tokens_per_batch * hidden * layers + d0`` (weights, activations kept for the
  backward pass, and a constant);
- ``layerwise_peak = e * largest_group_bytes + f`` (one block or the embedding group, read, factorised, written).

The largest size is held out of every fit and its prediction error printed; the fits then predict a 7B and a 70B
Llama (CPU seconds for one thread of this machine; docs/large_models.md turns them into GPU estimates).

Run: ``PYTHONPATH=src:. python benchmarks/scale_model.py``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

LLAMAS = {  # hidden, intermediate, layers, vocab, k/v projection size (kv heads x head size)
    "Llama-2-7B": (4096, 11008, 32, 32000, 4096),
    "Llama-2-70B": (8192, 28672, 80, 32000, 1024),
}


def _intermediate(hidden: int) -> int:
    return int(round(8 * hidden / 3 / 64)) * 64


def _kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _kib("VmRSS")


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fwsvd import FWSVDConfig, compress_layerwise, compute_importances, save_importances

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    hidden = args.child
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=hidden, intermediate_size=_intermediate(hidden),
        num_hidden_layers=args.layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(f"{tmp}/dense")
        generator = torch.Generator().manual_seed(0)
        data = [{"input_ids": torch.randint(0, args.vocab, (args.seq_len,), generator=generator).tolist()}
                for _ in range(args.samples)]  # fmt: skip
        model = LlamaForCausalLM.from_pretrained(f"{tmp}/dense", dtype=torch.float32)
        run = FWSVDConfig(calibration_dataset=data, num_samples=args.samples, batch_size=args.batch_size)
        base = _reset_peak()
        start = time.perf_counter()
        importances = compute_importances(model, run, show_progress=False)
        fisher_s = time.perf_counter() - start
        fisher_peak = _kib("VmHWM") - base
        save_importances(importances, f"{tmp}/importances.safetensors")
        del model
        base = _reset_peak()
        start = time.perf_counter()
        run = FWSVDConfig(rank_ratio=0.33, svd_solver="full", importances=f"{tmp}/importances.safetensors")
        compress_layerwise(f"{tmp}/dense", f"{tmp}/out", run, show_progress=False)
        factorise_s = time.perf_counter() - start
        layerwise_peak = _kib("VmHWM") - base
    result = {"hidden": hidden, "fisher_s": fisher_s, "factorise_s": factorise_s}
    result.update(fisher_peak_mib=fisher_peak / 1024, layerwise_peak_mib=layerwise_peak / 1024)
    print(json.dumps(result))


def features(hidden: int, intermediate: int, layers: int, vocab: int, kv_dim: int, tokens: int, batch_tokens: int):
    """Analytic quantities the fits use, for one Llama shape."""
    shapes = [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden)]
    shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    block_params = sum(m * n for m, n in shapes)
    return {
        "F": 6 * tokens * block_params * layers,
        "S": layers * sum(m * n * min(m, n) for m, n in shapes),
        "n_matrices": 7 * layers,
        "weights_bytes": 4 * (layers * block_params + 2 * vocab * hidden),
        "activations": batch_tokens * hidden * layers,
        "largest_group_bytes": 4 * max(block_params, 2 * vocab * hidden),
    }


def _fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on relative errors (each row divided by its target)."""
    coefficients, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    return coefficients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hiddens", type=int, nargs="+", default=[512, 640, 768, 896, 1024])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.perf_common import machine_line, markdown_table

    print(f"# Cost model of compressing a Llama\n\n{machine_line()}\n")
    rows = []
    for hidden in args.hiddens:
        command = [sys.executable, __file__, "--child", str(hidden)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("layers", "vocab", "seq_len", "samples", "batch_size")
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"measured hidden {hidden}: {rows[-1]}", flush=True)
    tokens, batch_tokens = args.samples * args.seq_len, args.batch_size * args.seq_len
    feats = [features(r["hidden"], _intermediate(r["hidden"]), args.layers, args.vocab, r["hidden"], tokens,
                      batch_tokens) for r in rows]  # fmt: skip
    columns = {
        "fisher_s": lambda f: [f["F"], 1.0],
        "factorise_s": lambda f: [f["S"], f["n_matrices"]],
        "fisher_peak_mib": lambda f: [f["weights_bytes"] / 2**20, f["activations"], 1.0],
        "layerwise_peak_mib": lambda f: [f["largest_group_bytes"] / 2**20, 1.0],
    }
    fits, table = {}, []
    for target, design in columns.items():
        x = np.array([design(f) for f in feats], dtype=float)
        y = np.array([r[target] for r in rows], dtype=float)
        held_out = _fit(x[:-1], y[:-1])
        prediction = float(x[-1] @ held_out)
        fits[target] = _fit(x, y)
        in_sample = np.abs(x[:-1] @ held_out / y[:-1] - 1)
        table.append([target, ", ".join(f"{c:.4g}" for c in fits[target]), f"{100 * in_sample.max():.1f}%",
                      f"{y[-1]:.2f}", f"{prediction:.2f}", f"{100 * (prediction / y[-1] - 1):+.1f}%"])  # fmt: skip
    print("\nMeasured (one torch thread; peaks above the import floor):\n")
    headers = ["hidden", "intermediate", "fisher s", "factorise s", "fisher peak MiB", "layerwise peak MiB"]
    print(markdown_table(headers, [[r["hidden"], _intermediate(r["hidden"]), f"{r['fisher_s']:.2f}",
                                    f"{r['factorise_s']:.2f}", f"{r['fisher_peak_mib']:.0f}",
                                    f"{r['layerwise_peak_mib']:.0f}"] for r in rows]))  # fmt: skip
    print(f"\nFits on all but hidden {rows[-1]['hidden']}, checked on it (held out):\n")
    headers = ["quantity", "coefficients (all sizes)", "max in-sample error", "held-out measured",
               "held-out predicted", "held-out error"]  # fmt: skip
    print(markdown_table(headers, table))
    print(f"\nPredictions ({args.samples} x {args.seq_len} calibration tokens, batch {args.batch_size}, fp32, one CPU "
          "thread of this machine):\n")  # fmt: skip
    predictions = []

    def predict(target: str, f: dict) -> float:
        return float(np.dot(columns[target](f), fits[target]))

    for name, shape in LLAMAS.items():
        f = features(*shape, tokens=tokens, batch_tokens=batch_tokens)
        predictions.append(
            [name, f"{f['weights_bytes'] / 2**30:.1f}", f"{predict('fisher_s', f) / 3600:.1f}",
             f"{predict('factorise_s', f) / 3600:.1f}", f"{predict('fisher_peak_mib', f) / 1024:.1f}",
             f"{predict('layerwise_peak_mib', f) / 1024:.2f}", f"{f['F']:.3g}", f"{f['S']:.3g}"]
        )  # fmt: skip
    headers = ["model", "fp32 weights GiB", "fisher h", "factorise h", "fisher peak GiB", "layerwise peak GiB",
               "Fisher FLOPs F", "SVD work S"]  # fmt: skip
    print(markdown_table(headers, predictions))
    print(f"\nfinished: {machine_line()}")


if __name__ == "__main__":
    main()
