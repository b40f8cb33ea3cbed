"""Peak memory of compress-on-load and `compress` on the MiniLM task model, per phase, above the import floor.

Each call measures one run in this fresh process: the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the RSS after imports and data loading, in MiB, printed as one JSON line.

- ``on-load [BATCH]``: ``from_pretrained(..., fwsvd_config=...)`` with 32 training sentences (batch size BATCH, default
  8), rank ratio 0.25;
- ``importances``: the same with precomputed importances (factorisation only). The first call writes the importances
  file and exits; run it again for the measurement;
- ``layerwise [BATCH]``: `compress_layerwise` of the saved task model with its Fisher estimated from the same 32
  sentences block by block (the block-wise backward pass), then block-by-block factorisation;
- ``layerwise-importances``: `compress_layerwise` with the precomputed importances of ``importances`` (factorisation
  only; run ``importances`` first);
- ``phases``: `from_pretrained`, then the Fisher pass (`collect_statistics`), then `compress` with those statistics,
  each phase's peak reported separately.

Run: ``PYTHONPATH=src:. python benchmarks/memory_phases.py on-load 8``
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import torch


def _kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


def _reset() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.assets import polarity_splits
    from benchmarks.task_model import build_task_model
    from hf_fwsvd import FWSVDConfig, compress, compress_layerwise, compute_importances, save_importances
    from hf_fwsvd.methods import collect_statistics
    from hf_fwsvd.targets import find_target_modules

    transformers.logging.set_verbosity_error()
    mode = sys.argv[1]
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    path = str(build_task_model())
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = polarity_splits()["train"][:32]
    config = FWSVDConfig(
        rank_ratio=0.25, method="fwsvd", calibration_dataset=data, tokenizer=tokenizer, batch_size=batch_size
    )
    if mode in ("importances", "layerwise-importances"):
        cache = os.path.join(tempfile.gettempdir(), "hf_fwsvd_minilm_importances.safetensors")
        if not os.path.exists(cache):
            model = AutoModelForSequenceClassification.from_pretrained(path)
            save_importances(compute_importances(model, config, show_progress=False), cache)
            print(json.dumps({"wrote": cache, "note": "run again to measure"}))
            return
        config = FWSVDConfig(rank_ratio=0.25, importances=cache)
    floor = _kib("VmRSS")
    _reset()
    if mode in ("layerwise", "layerwise-importances"):
        with tempfile.TemporaryDirectory() as out:
            compress_layerwise(path, os.path.join(out, "minilm"), config, show_progress=False)
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))
        peak = (_kib("VmHWM") - floor) / 1024
        print(json.dumps({"mode": mode, "batch_size": batch_size, "peak_mib": peak, "model_mib": size / 2**20,
                          "peak_vs_model": peak / (size / 2**20)}))  # fmt: skip
        return
    if mode in ("on-load", "importances"):
        AutoModelForSequenceClassification.from_pretrained(path, fwsvd_config=config)
        print(json.dumps({"mode": mode, "batch_size": batch_size, "peak_mib": (_kib("VmHWM") - floor) / 1024}))
        return
    model = AutoModelForSequenceClassification.from_pretrained(path)
    result = {"load_peak_mib": (_kib("VmHWM") - floor) / 1024}
    _reset()
    stats = collect_statistics(model, config.copy_for_run(), find_target_modules(model, config), show_progress=False)
    result.update(fisher_peak_mib=(_kib("VmHWM") - floor) / 1024, rss_after_fisher_mib=(_kib("VmRSS") - floor) / 1024)
    _reset()
    compress(model, config, statistics=stats, show_progress=False)
    result.update(factorise_peak_mib=(_kib("VmHWM") - floor) / 1024, rss_after_mib=(_kib("VmRSS") - floor) / 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
