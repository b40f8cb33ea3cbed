"""The README's int8 example, run for real (issue #15): `hf_fwsvd.quantize_int8` on a cached low-rank MPNet model.

Loads the whitened, recovery-fine-tuned model of `benchmarks/int8_recipes.py` (``build --fraction 0.5 --finetune``),
then does what a user does: fold the smoothing into a copy and save it with ``save_pretrained`` (fp32, a normal FWSVD
checkpoint), and quantise with ``quantize_int8`` from 128 training texts (never the test split). Prints the library's
log lines, the test accuracy and the saved sizes. Run from the repository root with ``PYTHONPATH=src:.``:
``python benchmarks/int8_deploy_demo.py --task polarity``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.headline import TaskRun, quiet_logging, saved_mb
from benchmarks.int8_recipes import load_base
from hf_fwsvd import fold_smoothing, quantize_int8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="polarity")
    parser.add_argument("--base", default="whiten0.5+ft", help="an int8_recipes.py base name")
    args = parser.parse_args(argv)
    quiet_logging()
    logging.getLogger("hf_fwsvd.int8_deploy").setLevel(logging.INFO)
    torch.set_num_threads(1)
    run = TaskRun(args.task)
    model = load_base(run, args.base)
    train_texts = [example["text"] for example in run.splits["train"][:128]]

    smoothed = copy.deepcopy(model)
    fold_smoothing(smoothed, train_texts, run.tokenizer, max_length=64, show_progress=False)
    with tempfile.TemporaryDirectory() as directory:
        smoothed.save_pretrained(directory)
        size = sum(f.stat().st_size for f in Path(directory).iterdir()) / 1e6
        reloaded = type(model).from_pretrained(directory)
    print(f"smoothed fp32 checkpoint: {size:.1f} MB, test accuracy {run.evaluate(reloaded)[0]:.4f}")

    int8_model = quantize_int8(model, calibration_dataset=train_texts, tokenizer=run.tokenizer, max_length=64)
    print(f"int8 model: {saved_mb(int8_model):.1f} MB, test accuracy {run.evaluate(int8_model)[0]:.4f}")


if __name__ == "__main__":
    main()
