"""Worker for test_performance_scale.py: compress a checkpoint block by block under a data-segment limit.

Usage: ``python tests/memory_limit_worker.py DENSE_DIR WARMUP_DIR OUT_DIR BUDGET_MIB IMPORTANCES``. After a warm-up
run on the tiny checkpoint in ``WARMUP_DIR`` (so every lazy import has happened), the process caps its anonymous
memory (``RLIMIT_DATA``: heap and private writable mappings, i.e. every torch tensor and the private mapping through
which safetensors reads each shard) at its current size plus ``BUDGET_MIB``. It then shows that the cap bites (a
tensor the size of the model cannot be allocated) and compresses ``DENSE_DIR`` with `compress_layerwise` three times:
plain SVD into ``OUT_DIR/svd``, FWSVD with the precomputed importances into ``OUT_DIR/fwsvd``, and FWSVD with its
Fisher estimated from calibration data (`calibration_examples`, the block-wise backward pass) into
``OUT_DIR/fwsvd_data``. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys

import torch

from hf_fwsvd import FWSVDConfig, compress_layerwise

RANK_RATIO = 0.25


def calibration_examples(vocab: int, count: int = 8, length: int = 16) -> list[dict]:
    """Causal-LM calibration examples (token ids; the labels are the inputs)."""
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, vocab, (length,), generator=generator).tolist()} for _ in range(count)]


def fisher_config(vocab: int) -> FWSVDConfig:
    return FWSVDConfig(
        rank_ratio=RANK_RATIO, method="fwsvd", calibration_dataset=calibration_examples(vocab), batch_size=4
    )


def _vm_data_bytes() -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(r"VmData:\s+(\d+)", handle.read()).group(1)) * 1024


def main() -> None:
    dense_dir, warmup, out_dir, budget_mib, importances = sys.argv[1:]
    budget_mib = float(budget_mib)
    torch.set_num_threads(1)
    compress_layerwise(warmup, os.path.join(out_dir, "warmup"), FWSVDConfig(rank=2, method="svd"), show_progress=False)
    warmup_vocab = json.load(open(os.path.join(warmup, "config.json")))["vocab_size"]  # noqa: SIM115
    compress_layerwise(
        warmup, os.path.join(out_dir, "warmup-fisher"), fisher_config(warmup_vocab), show_progress=False
    )
    vocab = json.load(open(os.path.join(dense_dir, "config.json")))["vocab_size"]  # noqa: SIM115

    model_bytes = sum(os.path.getsize(os.path.join(dense_dir, name)) for name in os.listdir(dense_dir)
                      if name.endswith(".safetensors"))  # fmt: skip
    limit = _vm_data_bytes() + int(budget_mib * 2**20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        torch.empty(model_bytes // 4, dtype=torch.float32).fill_(0)
        whole_model_fits = True
    except RuntimeError:
        whole_model_fits = False
    results = {"model_mib": model_bytes / 2**20, "budget_mib": budget_mib, "whole_model_fits": whole_model_fits}
    configs = {
        "svd": FWSVDConfig(rank_ratio=RANK_RATIO, method="svd"),
        "fwsvd": FWSVDConfig(rank_ratio=RANK_RATIO, method="fwsvd", importances=importances),
        "fwsvd_data": fisher_config(vocab),
    }
    for name, config in configs.items():
        report = compress_layerwise(dense_dir, os.path.join(out_dir, name), config, show_progress=False)
        results[name] = report.params_ratio
    print(json.dumps(results))


if __name__ == "__main__":
    main()
