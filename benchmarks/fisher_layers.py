"""Does the Fisher-weighted reconstruction error predict the task-loss increase, layer by layer?

FWSVD rests on the second-order estimate ``dL ~ 1/2 sum_oi F_i (W - W')_oi^2`` of the loss increase caused by
replacing one layer's weight ``W`` by its low-rank ``W'``. This script tests it on an all-mpnet-base-v2 task model
(``benchmarks/task_model.py``): for a set of modules (``--layers`` x ``--kinds``), it compresses **only that module**
(`FWSVDConfig(target_modules=[name])`) with plain SVD and with FWSVD under each Fisher estimator, measures the real
increase of the mean loss on dev examples (never the test split), and compares it with the estimate under each
estimator's Fisher. It also prints how concentrated each estimator's Fisher is (share of the top 10% of input
features, effective number of features as a fraction).

Run e.g. ``python benchmarks/fisher_layers.py --task polarity`` (``--help`` for options); the rows go to
``results/headline/fisher_layers_<task>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.assets import TASKS, task_splits
from benchmarks.fisher_analysis import fisher_concentration
from benchmarks.headline import CALIBRATION, RESULTS, calibration_sample, predict
from benchmarks.task_model import build_mpnet_task_model, label_tensor
from hf_fwsvd import FWSVDConfig, compress, compute_importances

logger = logging.getLogger(__name__)


def mean_loss(model, tokenizer, examples, labels, regression: bool) -> float:
    logits = predict(model, tokenizer, examples)
    if regression:
        return float((logits.squeeze(-1) - labels).square().mean())
    return float(torch.nn.functional.cross_entropy(logits, labels))


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="polarity", choices=list(TASKS))
    parser.add_argument("--layers", nargs="+", type=int, default=[0, 5, 11])
    parser.add_argument(
        "--kinds", nargs="+", default=["attention.attn.q", "attention.attn.o", "intermediate.dense", "output.dense"]
    )
    parser.add_argument("--rank-ratio", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--dev-size", type=int, default=200)
    parser.add_argument("--estimators", nargs="+", default=["empirical", "true"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("transformers", "hf_fwsvd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)

    task_dir = build_mpnet_task_model(args.task)
    regression = TASKS[args.task][0] == 1
    splits = task_splits(args.task)
    dev = splits["dev"][: args.dev_size]
    labels = label_tensor(dev, regression)
    tokenizer = AutoTokenizer.from_pretrained(task_dir)
    model = AutoModelForSequenceClassification.from_pretrained(task_dir).eval()
    calibration = calibration_sample(splits["train"], args.num_samples, 0)
    fishers = {}
    for estimator in args.estimators:
        start = time.perf_counter()
        config = FWSVDConfig(
            calibration_dataset=calibration,
            tokenizer=tokenizer,
            num_samples=len(calibration),
            fisher_estimator=estimator,
            **CALIBRATION,
        )
        fishers[estimator] = compute_importances(model, config, show_progress=False)
        logger.info("%s Fisher in %.0f s", estimator, time.perf_counter() - start)
    print("\n| estimator | top-10% share (mean over modules) | effective features (fraction) |")
    print("|---|---|---|")
    for estimator, fisher in fishers.items():
        conc = [fisher_concentration(v) for v in fisher.values()]
        top, effective = statistics.fmean(c[0] for c in conc), statistics.fmean(c[1] for c in conc)
        print(f"| {estimator} | {top:.3f} | {effective:.3f} |")

    base = mean_loss(model, tokenizer, dev, labels, regression)
    logger.info("dense dev loss %.4f", base)
    out = RESULTS / f"fisher_layers_{args.task}.csv"
    RESULTS.mkdir(parents=True, exist_ok=True)
    names = [f"mpnet.encoder.layer.{layer}.{kind}" for layer in args.layers for kind in args.kinds]
    methods = [("svd", None)] + [("fwsvd", e) for e in args.estimators]
    rows = []
    for name in names:
        original = model.get_submodule(name)
        weight = original.weight.detach().float()
        for method, estimator in methods:
            config = FWSVDConfig(
                method=method,
                rank_ratio=args.rank_ratio,
                target_modules=[name],
                importances={name: fishers[estimator][name]} if estimator else None,
            )
            compress(model, config, show_progress=False)
            low_rank = model.get_submodule(name)
            delta = (weight - low_rank.weight.detach().float()).square().sum(0)
            loss = mean_loss(model, tokenizer, dev, labels, regression)
            model.set_submodule(name, original)  # put the dense layer back
            for attribute in ("fwsvd_report",):
                if hasattr(model, attribute):
                    delattr(model, attribute)
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            row = {"module": name, "method": method + (f"-{estimator}" if estimator else ""), "actual": loss - base}
            for fisher_name, fisher in fishers.items():
                row[f"predicted_{fisher_name}"] = 0.5 * float((delta * fisher[name]).sum())
            row["plain_error"] = float(delta.sum() / weight.square().sum())
            rows.append(row)
            logger.info("%s", row)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    print(
        f"\n{args.task}: rank ratio {args.rank_ratio}, one module compressed at a time, dev loss increase "
        f"(dense {base:.4f}, {len(dev)} dev examples)\n"
    )
    print("| module | " + " | ".join(m + (f"-{e}" if e else "") for m, e in methods) + " |")
    print("|---|" + "---|" * len(methods))
    for name in names:
        cells = [f"{r['actual']:+.4f}" for r in rows if r["module"] == name]
        print(f"| {name.replace('mpnet.encoder.layer.', 'L')} | " + " | ".join(cells) + " |")
    print("\n| predictor | Spearman with the actual increase (all rows) | Pearson |")
    print("|---|---|---|")
    actual = [r["actual"] for r in rows]
    for key in [k for k in rows[0] if k.startswith("predicted_")] + ["plain_error"]:
        pearson = float(torch.corrcoef(torch.tensor([[r[key] for r in rows], actual]))[0, 1])
        print(f"| {key} | {spearman([r[key] for r in rows], actual):.3f} | {pearson:.3f} |")
    wins = {m: 0 for m, e in methods[1:]}
    for method, estimator in methods[1:]:
        label = f"{method}-{estimator}"
        wins[label] = sum(
            a["actual"] < b["actual"]
            for a, b in zip(
                [r for r in rows if r["method"] == label], [r for r in rows if r["method"] == "svd"], strict=True
            )
        )
    print(
        "\nModules where the Fisher-weighted factorisation raised the loss less than SVD: "
        + ", ".join(f"{k}: {v}/{len(names)}" for k, v in wins.items() if k != "fwsvd")
    )


if __name__ == "__main__":
    main()
