"""Why FWSVD beats SVD (or not) on a model: Fisher concentration and weighted vs plain errors, layer by layer.

For every targeted Linear this factorises the weight at one rank ratio with plain SVD and with FWSVD (the cached
Fisher importances written by ``compare_methods.py`` / ``compare_lm.py``) and prints, per kind of layer:

* how concentrated the Fisher is over the input features: the share of the total importance held by the top 10% of
  features, and the effective number of features ``exp(entropy)`` as a fraction of all features (1.0 = uniform
  importances, where FWSVD is exactly SVD);
* the plain relative error ``||W - W'|| / ||W||`` and the Fisher-weighted one
  ``||(W - W') diag(sqrt I)|| / ||W diag(sqrt I)||`` of both factorisations.

FWSVD minimises the weighted error, SVD the plain one; the weighted error is the first-order proxy for the increase
of the task loss that FWSVD relies on. Run e.g.
``python benchmarks/fisher_analysis.py --model minilm --rank-ratio 0.33``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.assets import cache_dir
from hf_fwsvd import FWSVDConfig, factorize, load_importances
from hf_fwsvd.factorize import relative_errors
from hf_fwsvd.layers import dense_weight
from hf_fwsvd.ranks import rank_for_shape
from hf_fwsvd.targets import find_target_modules

__all__ = ["fisher_concentration", "layer_errors"]


def fisher_concentration(importance: torch.Tensor) -> tuple[float, float]:
    """``(share of importance in the top 10% of features, exp(entropy) / number of features)``."""
    p = importance.double() / importance.double().sum()
    top = max(1, round(0.1 * p.numel()))
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(p.sort(descending=True).values[:top].sum()), float(entropy.exp() / p.numel())


def layer_errors(model: torch.nn.Module, importances: dict[str, torch.Tensor], rank_ratio: float) -> list[dict]:
    """Per targeted module: Fisher concentration and plain/weighted errors of SVD and FWSVD at `rank_ratio`."""
    config = FWSVDConfig(rank_ratio=rank_ratio)
    rows = []
    for name, module in find_target_modules(model, config).items():
        weight = dense_weight(module).detach().float()
        rank = rank_for_shape(weight.shape[0], weight.shape[1], config, name)
        importance = importances[name]
        row = {"name": name, "kind": re.sub(r"\.\d+\.", ".N.", name)}
        row["top10"], row["effective"] = fisher_concentration(importance)
        for method, weighting in (("svd", None), ("fwsvd", importance)):
            errors = relative_errors(weight, factorize(weight, rank, weighting, name=name).product(), importance)
            row[f"{method}_plain"], row[f"{method}_weighted"] = errors["plain"], errors["weighted"]
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> str:
    """A table of the per-kind means of `layer_errors` rows, then the overall mean."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["kind"]].append(row)
    groups["all modules"] = rows
    keys = ["top10", "effective", "svd_plain", "fwsvd_plain", "svd_weighted", "fwsvd_weighted"]
    header = f"| {'layer kind':<44} | " + " | ".join(f"{k:>14}" for k in keys) + " |"
    lines = [header, "|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|"]
    for kind, members in groups.items():
        means = [sum(m[k] for m in members) / len(members) for k in keys]
        lines.append(f"| {kind:<44} | " + " | ".join(f"{v:>14.4f}" for v in means) + " |")
    return "\n".join(lines)


@torch.no_grad()
def dev_predictions(model: torch.nn.Module, tokenizer, examples: list[dict], max_length: int = 64) -> dict:
    """Per-example cross-entropy and correctness of a classifier (for paired SVD vs FWSVD comparisons)."""
    model.eval()
    losses, correct = [], []
    for start in range(0, len(examples), 64):
        chunk = examples[start : start + 64]
        batch = tokenizer(
            [e["text"] for e in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        logits = model(**batch).logits.float()
        labels = torch.tensor([e["label"] for e in chunk])
        losses += torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist()
        correct += (logits.argmax(-1) == labels).tolist()
    return {"loss": losses, "correct": correct}


def paired_dev_comparison(levels: list[float]) -> str:
    """Dev cross-entropy and accuracy of SVD and FWSVD at each rank ratio, with the paired disagreement counts."""
    from transformers import AutoTokenizer

    from benchmarks.assets import polarity_splits
    from benchmarks.compare_methods import compress_point
    from benchmarks.task_model import build_task_model

    task_dir = build_task_model()
    tokenizer = AutoTokenizer.from_pretrained(task_dir)
    dev = polarity_splits()["dev"]
    importances = load_importances(cache_dir() / "fisher" / "minilm-polarity_train_1024.safetensors")
    lines = [
        "| rank ratio | SVD dev loss | FWSVD dev loss | SVD acc | FWSVD acc | only SVD right | only FWSVD right "
        "| McNemar exact p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        result = {}
        for method in ("svd", "fwsvd"):
            model, _ = compress_point(task_dir, method, importances, rank_ratio=level)
            result[method] = dev_predictions(model, tokenizer, dev)
        svd, fw = result["svd"], result["fwsvd"]
        only_svd = sum(a and not b for a, b in zip(svd["correct"], fw["correct"], strict=True))
        only_fw = sum(b and not a for a, b in zip(svd["correct"], fw["correct"], strict=True))
        n, k = only_svd + only_fw, min(only_svd, only_fw)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        lines.append(
            f"| {level:g} | {mean(svd['loss']):.4f} | {mean(fw['loss']):.4f} | {mean(svd['correct']):.4f} "
            f"| {mean(fw['correct']):.4f} | {only_svd} | {only_fw} | {p:.3g} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--rank-ratio", type=float, default=0.33)
    parser.add_argument("--fisher", type=Path, help="importances file (default: the cached one for --model)")
    parser.add_argument("--paired-dev", type=float, nargs="+", help="instead: paired dev comparison at these ratios")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.paired_dev:
        print(paired_dev_comparison(args.paired_dev))
        return
    if args.model == "minilm":
        from transformers import AutoModelForSequenceClassification

        from benchmarks.task_model import build_task_model

        model = AutoModelForSequenceClassification.from_pretrained(build_task_model())
        fisher = args.fisher or cache_dir() / "fisher" / "minilm-polarity_train_1024.safetensors"
    else:
        from transformers import AutoModelForCausalLM

        from benchmarks.assets import smollm2_dir

        model = AutoModelForCausalLM.from_pretrained(smollm2_dir())
        fisher = args.fisher or cache_dir() / "fisher" / "smollm2_sotu_32x256.safetensors"
    rows = layer_errors(model, load_importances(fisher), args.rank_ratio)
    print(f"{args.model}, rank ratio {args.rank_ratio}, Fisher {fisher.name}")
    print(summarise(rows))


if __name__ == "__main__":
    main()
