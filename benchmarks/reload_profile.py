"""Where a compressed reload spends its time: `from_pretrained` of a dense and a compressed checkpoint, with the
FWSVD hooks and transformers' loading steps timed individually (wrapped with timers for the run).

Prints the median total of each load, their paired ratio, and the median time of each step per load: ``finite``
(`check_factors_finite`), ``skeleton`` (`build_low_rank_skeleton`), ``match_ranks`` (`check_weights_match_ranks`),
``preprocess`` / ``postprocess`` (the quantizer hooks around weight loading), ``convert_and_load`` (transformers
reading the tensors into the model), ``finalize`` and ``init_missing`` (transformers' post-load steps).

Run: ``PYTHONPATH=src:. python benchmarks/reload_profile.py --model minilm --repeats 15``
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import tempfile
import time

import torch

from benchmarks.perf_common import machine_line, markdown_table, set_threads

_TIMES: dict[tuple[str, str], list[float]] = {}
_CURRENT = [""]


def _wrap(owner: object, attribute: str, label: str) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _TIMES.setdefault((_CURRENT[0], label), []).append(time.perf_counter() - start)

    setattr(owner, attribute, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(1)

    import transformers
    import transformers.core_model_loading  # noqa: F401
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import hf_fwsvd.quantizer as quantizer
    import hf_fwsvd.replace as replace
    from benchmarks.assets import minilm_dir, smollm2_dir
    from hf_fwsvd import FWSVDConfig, compress

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    _wrap(quantizer, "check_factors_finite", "finite")
    _wrap(quantizer, "check_weights_match_ranks", "match_ranks")
    _wrap(replace, "build_low_rank_skeleton", "skeleton")
    _wrap(quantizer.FWSVDHfQuantizer, "preprocess_model", "preprocess")
    _wrap(quantizer.FWSVDHfQuantizer, "postprocess_model", "postprocess")
    _wrap(modeling_utils, "convert_and_load_state_dict_in_model", "convert_and_load")
    _wrap(modeling_utils.PreTrainedModel, "_finalize_model_loading", "finalize")
    _wrap(modeling_utils.PreTrainedModel, "_initialize_missing_keys", "init_missing")

    print(f"# Reload profile ({args.model}, rank ratio {args.rank_ratio})\n\n{machine_line()}\n")
    if args.model == "smollm2":
        source, model_class, extra = smollm2_dir(), AutoModelForCausalLM, {"dtype": torch.float32}
    else:
        source, model_class, extra = minilm_dir(), AutoModelForSequenceClassification, {"num_labels": 2}
    torch.manual_seed(0)
    dense = model_class.from_pretrained(source, **extra).eval()
    with tempfile.TemporaryDirectory() as tmp:
        dense.save_pretrained(f"{tmp}/dense")
        compress(dense, FWSVDConfig(rank_ratio=args.rank_ratio, method="svd"), show_progress=False)
        dense.save_pretrained(f"{tmp}/compressed")
        del dense
        variants = ("dense", "compressed")
        for name in variants:
            model_class.from_pretrained(f"{tmp}/{name}")  # warm-up
        _TIMES.clear()
        for _ in range(args.repeats):
            for name in variants:
                _CURRENT[0] = name
                start = time.perf_counter()
                model_class.from_pretrained(f"{tmp}/{name}")
                _TIMES.setdefault((name, "total"), []).append(time.perf_counter() - start)
    pairs = zip(_TIMES[("dense", "total")], _TIMES[("compressed", "total")], strict=True)
    ratio = statistics.median(compressed / dense for dense, compressed in pairs)
    labels = sorted({label for _, label in _TIMES}, key=lambda label: (label != "total", label))
    rows = [
        [label] + [f"{statistics.median(_TIMES[(name, label)]) * 1e3:.2f}" if (name, label) in _TIMES else ""
                   for name in variants]
        for label in labels
    ]  # fmt: skip
    print(markdown_table(["step", "dense ms", "compressed ms"], rows) + "\n")
    print(f"compressed / dense (median of paired ratios): {ratio:.2f}\n\nfinished: {machine_line()}")


if __name__ == "__main__":
    main()
