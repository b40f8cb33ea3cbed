"""Worker for test_distributed.py, run once per process by ``accelerate launch``: estimate, compress, save.

Usage: ``accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py OUT_DIR`` (also runs as a single
plain process). Every process writes ``batches-rank{R}.json`` (the batch sizes its loss saw) and
``importances-rank{R}.safetensors``; the checkpoint and ``importances.safetensors`` are written by the library's own
main-process logic (`save_pretrained` on every process, `FWSVDConfig.importances_cache`). Then every registered method
compresses the model in memory (``methods/<method>``) and block by block from a dense checkpoint
(``layerwise/<method>``), its statistics collected data-parallel; ``methods.json`` lists the methods run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_model

from hf_fwsvd import FWSVDConfig, compress, compress_layerwise, estimate_fisher, save_importances
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.distributed import process_info
from hf_fwsvd.fisher import model_loss
from hf_fwsvd.methods import available_methods, get_method
from hf_fwsvd.pipeline import overrides_refine_model
from hf_fwsvd.targets import find_target_modules

# Odd count, batch 2: batches of 2, 2, 2, 2, 1 examples; with 2 processes rank 0 gets 3 batches, rank 1 gets 2.
NUM_EXAMPLES = 9
BATCH_SIZE = 2
RANK = 4


def build_model():
    from conftest import tiny_llama

    torch.manual_seed(0)
    return tiny_llama()


def data():
    from conftest import calibration_data

    return calibration_data("llama", count=NUM_EXAMPLES)


def config(**kwargs) -> FWSVDConfig:
    # method="fwsvd" explicitly: the Fisher pass is what is distributed (a causal LM would default to `whiten`)
    kwargs.setdefault("method", "fwsvd")
    return FWSVDConfig(rank=RANK, calibration_dataset=data(), batch_size=BATCH_SIZE, num_samples=None, **kwargs)


def run(out_dir: str) -> None:
    info = process_info()
    seen: list[int] = []

    def counting_loss(model, batch):
        seen.append(int(batch["input_ids"].shape[0]))
        return model_loss(model, batch)

    model = build_model()
    targets = find_target_modules(model, config())
    loader = build_calibration_loader(data(), model=model, num_samples=None, batch_size=BATCH_SIZE)
    importances = estimate_fisher(model, loader, targets, counting_loss, show_progress=False)
    from_list = estimate_fisher(model, list(loader), targets, show_progress=False)
    save_importances(importances, os.path.join(out_dir, f"importances-rank{info.index}.safetensors"))
    save_importances(from_list, os.path.join(out_dir, f"importances-list-rank{info.index}.safetensors"))
    with open(os.path.join(out_dir, f"batches-rank{info.index}.json"), "w") as handle:
        json.dump({"batches": seen, "world_size": info.count}, handle)

    compressed = compress(
        build_model(), config(importances_cache=os.path.join(out_dir, "importances.safetensors")), show_progress=False
    )
    compressed.save_pretrained(os.path.join(out_dir, "checkpoint"))

    with tempfile.TemporaryDirectory() as dense:  # one dense copy per process, outside OUT_DIR
        # every process needs its own copy (transformers' save_pretrained writes on the main process only)
        model = build_model()
        model.config.to_json_file(os.path.join(dense, "config.json"))
        save_model(model, os.path.join(dense, "model.safetensors"), metadata={"format": "pt"})
        for method in available_methods():
            compress(build_model(), config(method=method), show_progress=False).save_pretrained(
                os.path.join(out_dir, "methods", method)
            )
            if overrides_refine_model(get_method(method)):
                continue  # a model-level step (svdllm's sequential update) needs the model in memory
            layerwise = os.path.join(out_dir, "layerwise", method)
            compress_layerwise(dense, layerwise, config(method=method), model_class=type(model), show_progress=False)
    if info.is_main:
        with open(os.path.join(out_dir, "methods.json"), "w") as handle:
            json.dump(list(available_methods()), handle)


if __name__ == "__main__":
    run(sys.argv[1])
