"""Where the seed-to-seed spread of the recovered model comes from (issue #15, polarity): the compressed base or the
recovery fine-tune.

The bases are `benchmarks/int8_recipes.py`'s cached models (``whiten0.5[+ft][@seed]``: activation-whitened SVD
keeping half of every block module's weights, calibrated on 128 training examples drawn with the seed, ``+ft`` after
`RECOVERY_ARGS`' fine-tune with the same seed for its batch order and dropout). Two stages:

* ``--bases``: each named base scored on the development split (`benchmarks.recovery.dev_split`) and, with
  ``--test``, on the test split (a diagnosis only: nothing is chosen from these numbers);
* ``--refits base:seed``: the named base fine-tuned again with `RECOVERY_ARGS`, the fine-tune seeded with ``seed``
  (batch order and dropout) instead of the base's own, scored on the development split only. Crossing base seeds
  with fine-tune seeds separates the two sources of spread.

Results are merged into ``results/headline/recovery_seeds_<task>.json``. Run from the repository root with
``PYTHONPATH=src:.``, e.g. ``python benchmarks/recovery_seeds.py --task polarity --refits whiten0.5@2:0``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.headline import RESULTS, TaskRun, predict, quiet_logging, score
from benchmarks.int8_recipes import BASE_FINETUNE_LR, load_base
from benchmarks.recovery import RECOVERY_ARGS, dev_split, recovery_examples, recovery_finetune

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="polarity")
    parser.add_argument("--bases", nargs="*", default=[], help="int8_recipes base names, e.g. whiten0.5+ft@2")
    parser.add_argument("--test", action="store_true", help="also score --bases on the test split")
    parser.add_argument("--refits", nargs="*", default=[], help="base:finetune_seed, e.g. whiten0.5@2:0")
    args = parser.parse_args(argv)
    quiet_logging()
    torch.set_num_threads(1)
    run = TaskRun(args.task)
    dev = dev_split(run.splits["train"])
    dev_labels = torch.tensor([e["label"] for e in dev], dtype=torch.float32 if run.regression else torch.long)
    path = RESULTS / f"recovery_seeds_{args.task}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}

    def save(key: str, value: dict) -> None:
        results[key] = value
        path.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("%s %s", key, value)

    for name in args.bases:
        model = load_base(run, name)
        value = {"dev": round(score(predict(model, run.tokenizer, dev), dev_labels, run.regression)[0], 5)}
        if args.test:
            value["test"] = round(run.evaluate(model)[0], 5)
        save(name, value)
    for refit in args.refits:
        name, _, seed = refit.rpartition(":")
        model = copy.deepcopy(load_base(run, name))
        start = time.perf_counter()
        train = recovery_examples(run.splits["train"])
        info = recovery_finetune(model, run.tokenizer, train, learning_rate=BASE_FINETUNE_LR, seed=int(seed))
        info["wall_s"] = round(time.perf_counter() - start, 1)
        info["dev"] = round(score(predict(model, run.tokenizer, dev), dev_labels, run.regression)[0], 5)
        save(f"{name}+ft(seed {seed})", info | {"recipe": RECOVERY_ARGS | {"learning_rate": BASE_FINETUNE_LR}})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
