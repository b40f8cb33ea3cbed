"""SVD vs FWSVD on the real task model: dev accuracy/F1 against parameters kept, before and after a recovery fine-tune.

The paper's comparison (Hsu et al., ICLR 2022, Tables 1-2 and Figure 3) on the MiniLM polarity task model of
``benchmarks/task_model.py``: for each compression level the same dense model is compressed with plain `svd` and with
`fwsvd`, evaluated on the 800-sentence dev split as is, then fine-tuned with one short recovery fine-tune (identical
for both methods: ``RECOVERY_ARGS``) and evaluated again. The Fisher importances come from the training split only
(never the dev split), are computed once per model and reused across levels.

Two sweeps:

* ``--sweep rank`` (default): rank ratios 0.1, 0.2, 0.33, 0.5, 0.7 of every block Linear's full rank.
* ``--sweep param``: fraction of every block Linear's weights kept (0.95 ... 0.7), to find how much of an
  already-compact model can go within 1 accuracy point of the dense model.

Every finished point is appended to the CSV at once (a crash loses nothing; a rerun skips the points already there),
and a PNG plot (metric vs parameters kept, one line per method and stage, the dense model as a horizontal line) is
redrawn at the end. The functions `fisher_importances`, `compress_point`, `recovery_finetune` and `evaluate_point` are
reusable by other benchmarks.

Run from the repository root, e.g. ``python benchmarks/compare_methods.py --sweep rank`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.assets import cache_dir, polarity_splits
from benchmarks.task_model import build_task_model, train_classifier
from hf_fwsvd import FWSVDConfig, compress, compute_importances, load_importances, save_importances
from hf_fwsvd.evaluation import evaluate_classifier
from hf_fwsvd.layers import is_supported_linear
from hf_fwsvd.targets import find_target_modules

logger = logging.getLogger(__name__)

__all__ = [
    "CSV_FIELDS",
    "RECOVERY_ARGS",
    "compress_point",
    "evaluate_point",
    "fisher_importances",
    "plot_results",
    "recovery_finetune",
    "results_table",
    "run_sweep",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RANK_RATIOS = (0.1, 0.2, 0.33, 0.5, 0.7)
PARAM_RATIOS = (0.95, 0.9, 0.85, 0.8, 0.7)
# The recovery fine-tune: the task model's own loop and settings (AdamW 1e-4, 10% warm-up then linear decay, batches
# of 32 length-grouped training sentences, max length 64, embeddings frozen), cut to a fixed 30 steps (960 of the
# 3,200 training sentences, 0.3 epoch) so that the sweep fits the CPU budget of two shared cores (one step took 2-8 s
# depending on the load). The same seed gives both methods exactly the same batches in the same order.
RECOVERY_ARGS = {
    "max_steps": 30,
    "learning_rate": 1e-4,
    "batch_size": 32,
    "max_length": 64,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "freeze_embeddings": True,
    "seed": 0,
}
CSV_FIELDS = [
    "model",
    "method",
    "level_kind",
    "level",
    "stage",
    "accuracy",
    "f1",
    "params_total",
    "params_kept",
    "block_linear_params",
    "block_linear_kept",
    "weighted_error_mean",
    "plain_error_mean",
    "compress_s",
    "finetune_s",
    "eval_s",
]


def _params(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def fisher_importances(
    model: torch.nn.Module,
    tokenizer,
    train: list[dict],
    num_samples: int | None = None,
    batch_size: int = 16,
    max_length: int = 64,
    cache: Path | None = None,
) -> dict[str, torch.Tensor]:
    """Fisher importances of every block Linear of `model` from training examples, computed once and cached.

    Args:
        model (`torch.nn.Module`): The dense task model.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        train (`list[dict]`): Training examples ``{"text", "label"}`` (never the evaluation split).
        num_samples (`int`, *optional*): Use the first `num_samples` examples; all of them by default.
        batch_size (`int`, *optional*, defaults to 16): Calibration batch size.
        max_length (`int`, *optional*, defaults to 64): Truncation length.
        cache (`Path`, *optional*): A safetensors file: read if it exists, written after estimation otherwise.

    Returns:
        `dict[str, torch.Tensor]`: Module name -> importance per input feature, for `FWSVDConfig(importances=...)`.
    """
    if cache is not None and cache.is_file():
        logger.info("Fisher importances read from %s", cache)
        return load_importances(cache)
    config = FWSVDConfig(
        calibration_dataset=train,
        tokenizer=tokenizer,
        num_samples=num_samples,
        batch_size=batch_size,
        max_length=max_length,
    )
    start = time.perf_counter()
    importances = compute_importances(model, config)
    logger.info(
        "Fisher on %d training examples took %.0f s",
        min(len(train), num_samples or len(train)),
        time.perf_counter() - start,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_importances(importances, cache)
    return importances


def block_linear_params(model: torch.nn.Module) -> int:
    """Weight parameters of the Linear layers FWSVD targets by default (those inside the transformer blocks)."""
    targets = find_target_modules(model, FWSVDConfig())
    return sum(module.weight.numel() for module in targets.values() if is_supported_linear(module))


def compress_point(
    model_dir: Path,
    method: str,
    importances: dict[str, torch.Tensor] | None,
    rank_ratio: float | None = None,
    param_ratio: float | None = None,
    model_class=AutoModelForSequenceClassification,
) -> tuple[torch.nn.Module, float]:
    """Loads the dense model from `model_dir` and compresses it at one level.

    Args:
        model_dir (`Path`): The dense model's folder.
        method (`str`): ``"svd"`` or ``"fwsvd"``.
        importances (`dict`, *optional*): Precomputed Fisher importances (required for ``"fwsvd"``).
        rank_ratio (`float`, *optional*): Fraction of each module's full rank kept.
        param_ratio (`float`, *optional*): Fraction of each module's weights kept (give this or `rank_ratio`).
        model_class (*optional*): The transformers auto class to load with.

    Returns:
        `tuple`: ``(compressed model, seconds spent factorising)``; the model holds ``fwsvd_report``.
    """
    if method == "fwsvd" and importances is None:
        raise ValueError("compress_point(method='fwsvd') needs `importances` (see `fisher_importances`).")
    model = model_class.from_pretrained(model_dir)
    model.eval()
    config = FWSVDConfig(
        rank_ratio=rank_ratio,
        param_ratio=param_ratio,
        method=method,
        importances=importances if method == "fwsvd" else None,
    )
    start = time.perf_counter()
    compress(model, config, show_progress=False)
    return model, time.perf_counter() - start


def recovery_finetune(model: torch.nn.Module, tokenizer, train: list[dict], **overrides) -> dict:
    """The short recovery fine-tune of `RECOVERY_ARGS` (override any of its keys), in place; returns its stats."""
    return train_classifier(model, tokenizer, train, **(RECOVERY_ARGS | overrides))


def evaluate_point(model: torch.nn.Module, tokenizer, dev: list[dict]) -> tuple[dict, float]:
    """Dev accuracy and F1 (through `evaluate`) and the seconds it took."""
    start = time.perf_counter()
    metrics = evaluate_classifier(model, tokenizer, dev, batch_size=64, max_length=64)
    return metrics, time.perf_counter() - start


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV written by `append_row` (empty when the file does not exist yet)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict, fields: list[str] = CSV_FIELDS) -> None:
    """Append one row (missing fields left empty) to a results CSV; a new file gets its folder and header first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow({key: row.get(key, "") for key in fields})
        f.flush()


def _report_means(model: torch.nn.Module) -> dict:
    modules = model.fwsvd_report.modules
    return {
        "weighted_error_mean": round(sum(m.weighted_error for m in modules) / len(modules), 5),
        "plain_error_mean": round(sum(m.plain_error for m in modules) / len(modules), 5),
        "block_linear_kept": sum(m.params_after for m in modules),
    }


def run_sweep(
    model_dir: Path,
    model_name: str,
    levels: list[float],
    level_kind: str,
    methods: list[str],
    csv_path: Path,
    importances: dict[str, torch.Tensor],
    finetune: bool = True,
    dense_finetune: bool = False,
    report_path: Path | None = None,
) -> list[dict]:
    """Compress, evaluate, recovery-fine-tune and re-evaluate at each level with each method; rows go to `csv_path`.

    Points already in `csv_path` (same model, method, level kind, level and stage) are skipped, so an interrupted
    sweep resumes. With `report_path`, each compression's per-module report is appended to that JSON-lines file.
    """
    splits = polarity_splits()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    done = {(r["model"], r["method"], r["level_kind"], r["level"], r["stage"]) for r in read_rows(csv_path)}

    def key(method: str, level: float | str, stage: str) -> tuple:
        return (model_name, method, level_kind, str(level), stage)

    dense = AutoModelForSequenceClassification.from_pretrained(model_dir)
    dense_params, dense_linear = _params(dense), block_linear_params(dense)
    base = {"model": model_name, "level_kind": level_kind, "params_total": dense_params}
    base["block_linear_params"] = dense_linear
    if key("dense", 1.0, "none") not in done:
        metrics, eval_s = evaluate_point(dense, tokenizer, splits["dev"])
        append_row(
            csv_path,
            base
            | {
                "method": "dense",
                "level": 1.0,
                "stage": "none",
                "params_kept": 1.0,
                "block_linear_kept": dense_linear,
                "eval_s": round(eval_s, 1),
            }
            | metrics,
        )
        logger.info("dense: %s", metrics)
    del dense

    for level in levels:
        for method in methods:
            stages = ["none"] + (["recovery"] if finetune else [])
            if all(key(method, level, stage) in done for stage in stages):
                continue
            kwargs = {"rank_ratio": level} if level_kind == "rank_ratio" else {"param_ratio": level}
            model, compress_s = compress_point(model_dir, method, importances, **kwargs)
            point = base | {"method": method, "level": level, "compress_s": round(compress_s, 1)}
            point |= {"params_kept": round(_params(model) / dense_params, 5)} | _report_means(model)
            if report_path is not None and key(method, level, "none") not in done:
                with report_path.open("a") as f:
                    f.write(
                        json.dumps(
                            {"model": model_name, "level_kind": level_kind, "level": level}
                            | model.fwsvd_report.to_dict()
                        )
                        + "\n"
                    )
            if key(method, level, "none") not in done:
                metrics, eval_s = evaluate_point(model, tokenizer, splits["dev"])
                append_row(csv_path, point | {"stage": "none", "eval_s": round(eval_s, 1)} | metrics)
                logger.info(
                    "%s %s=%s: %s (%.1f%% params kept)", method, level_kind, level, metrics, 100 * point["params_kept"]
                )
            if finetune and key(method, level, "recovery") not in done:
                stats = recovery_finetune(model, tokenizer, splits["train"])
                metrics, eval_s = evaluate_point(model, tokenizer, splits["dev"])
                append_row(
                    csv_path,
                    point
                    | {"stage": "recovery", "finetune_s": round(stats["train_seconds"], 1), "eval_s": round(eval_s, 1)}
                    | metrics,
                )
                logger.info("%s %s=%s + recovery: %s", method, level_kind, level, metrics)
            del model
    if dense_finetune and key("dense", 1.0, "recovery") not in done:
        dense = AutoModelForSequenceClassification.from_pretrained(model_dir)
        stats = recovery_finetune(dense, tokenizer, splits["train"])
        metrics, eval_s = evaluate_point(dense, tokenizer, splits["dev"])
        append_row(
            csv_path,
            base
            | {
                "method": "dense",
                "level": 1.0,
                "stage": "recovery",
                "params_kept": 1.0,
                "block_linear_kept": dense_linear,
                "finetune_s": round(stats["train_seconds"], 1),
                "eval_s": round(eval_s, 1),
            }
            | metrics,
        )
        logger.info("dense + recovery fine-tune: %s", metrics)
    return read_rows(csv_path)


def plot_results(csv_path: Path, png_path: Path, metric: str = "accuracy", title: str | None = None) -> None:
    """Plot `metric` against whole-model parameters kept: one line per method and stage, the dense model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    styles = {"svd": ("tab:red", "SVD"), "fwsvd": ("tab:blue", "FWSVD")}
    for (method, stage), (color_label, linestyle) in [
        ((m, s), (styles[m], "-" if s == "none" else "--")) for m in styles for s in ("none", "recovery")
    ]:
        points = sorted(
            (float(r["params_kept"]), float(r[metric])) for r in rows if r["method"] == method and r["stage"] == stage
        )
        if not points:
            continue
        color, label = color_label
        suffix = "no fine-tune" if stage == "none" else "+ recovery fine-tune"
        marker = "o" if stage == "none" else "s"
        ax.plot(
            *zip(*points, strict=True), linestyle=linestyle, marker=marker, color=color, label=f"{label}, {suffix}"
        )
    label_rows = [r for r in rows if r["method"] == "svd" and r["stage"] == "none"]
    for row in label_rows:  # the compression level under each point
        ax.annotate(
            f"{float(row['level']):g}",
            (float(row["params_kept"]), float(row[metric])),
            fontsize=7,
            textcoords="offset points",
            xytext=(0, -11),
            ha="center",
            color="dimgrey",
        )
    for row in rows:
        if row["method"] == "dense":
            style = ":" if row["stage"] == "none" else "-."
            label = "dense" if row["stage"] == "none" else "dense + same recovery fine-tune"
            ax.axhline(
                float(row[metric]),
                color="black",
                linestyle=style,
                linewidth=1,
                label=f"{label} ({float(row[metric]):.3f})",
            )
    dense_rows = [r for r in rows if r["method"] == "dense" and r["stage"] == "none"]
    if dense_rows:
        top = float(dense_rows[0][metric])
        ax.axhspan(top - 0.01, top, color="grey", alpha=0.15, label="within 1 point of dense")
    if min(float(r[metric]) for r in rows) < 0.6:
        ax.axhline(0.5, color="grey", linewidth=0.6)
        ax.text(ax.get_xlim()[0], 0.505, "chance", color="grey", fontsize=8)
    kind = rows[0]["level_kind"].replace("_", " ") if rows else "level"
    ax.set_xlabel(f"whole-model parameters kept (fraction of dense); grey labels: {kind}")
    ax.set_ylabel(f"dev {metric}")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def results_table(csv_path: Path, metric: str = "accuracy") -> str:
    """Markdown table of `csv_path`: one line per level, SVD and FWSVD without and with the recovery fine-tune."""
    rows = read_rows(csv_path)
    cell = {(r["method"], r["level"], r["stage"]): r for r in rows}
    kind = rows[0]["level_kind"].replace("_", " ") if rows else "level"
    lines = [
        f"| {kind} | params kept (whole model) | block-Linear weights kept | SVD | FWSVD | FWSVD - SVD "
        "| SVD + recovery | FWSVD + recovery | FWSVD - SVD after recovery |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["method"] == "dense":
            label = "dense" if row["stage"] == "none" else "dense + the same recovery fine-tune"
            lines.append(f"| {label} | 1.000 | 1.000 | {float(row[metric]):.4f} | | | | | |")
    levels = sorted({r["level"] for r in rows if r["method"] != "dense"}, key=float)
    for level in levels:
        values = [
            cell.get((m, level, s))
            for s, m in [("none", "svd"), ("none", "fwsvd"), ("recovery", "svd"), ("recovery", "fwsvd")]
        ]
        some = next(v for v in values if v is not None)
        text = [f"{float(v[metric]):.4f}" if v is not None else "-" for v in values]
        diffs = []
        for a, b in ((values[0], values[1]), (values[2], values[3])):
            diffs.append(f"{100 * (float(b[metric]) - float(a[metric])):+.1f} pt" if a and b else "-")
        linear = int(some["block_linear_kept"]) / int(some["block_linear_params"])
        lines.append(
            f"| {float(level):g} | {float(some['params_kept']):.3f} | {linear:.3f} | {text[0]} | {text[1]} "
            f"| {diffs[0]} | {text[2]} | {text[3]} | {diffs[1]} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", choices=["rank", "param"], default="rank", help="rank ratios or param ratios")
    parser.add_argument("--levels", type=float, nargs="+", help="override the sweep's ratios")
    parser.add_argument("--methods", nargs="+", default=["svd", "fwsvd"], choices=["svd", "fwsvd"])
    parser.add_argument("--model-dir", type=Path, help="dense classifier folder (default: the MiniLM task model)")
    parser.add_argument("--model-name", default="minilm-polarity", help="name written in the CSV")
    parser.add_argument("--num-samples", type=int, default=None, help="training sentences for the Fisher (all)")
    parser.add_argument("--no-finetune", action="store_true", help="skip the recovery fine-tune")
    parser.add_argument("--dense-finetune", action="store_true", help="also give the dense model the same fine-tune")
    parser.add_argument("--recovery-steps", type=int, default=RECOVERY_ARGS["max_steps"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--out-prefix", type=Path, help="CSV/PNG/JSONL path prefix (default results/<model>_<sweep>)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the CSV and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    RECOVERY_ARGS["max_steps"] = args.recovery_steps
    prefix = args.out_prefix or RESULTS_DIR / f"{args.model_name}_{args.sweep}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = prefix.with_suffix(".csv"), prefix.with_suffix(".png")
    level_kind = "rank_ratio" if args.sweep == "rank" else "param_ratio"
    title = f"{args.model_name}: SVD vs FWSVD by {level_kind.replace('_', ' ')}"
    if not args.plot_only:
        model_dir = args.model_dir or build_task_model()
        splits = polarity_splits()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dense = AutoModelForSequenceClassification.from_pretrained(model_dir)
        tag = "all" if args.num_samples is None else args.num_samples
        cache = cache_dir() / "fisher" / f"{args.model_name}_train_{tag}.safetensors"
        importances = fisher_importances(dense, tokenizer, splits["train"], args.num_samples, cache=cache)
        del dense
        levels = args.levels or (RANK_RATIOS if args.sweep == "rank" else PARAM_RATIOS)
        run_sweep(
            Path(model_dir),
            args.model_name,
            list(levels),
            level_kind,
            args.methods,
            csv_path,
            importances,
            finetune=not args.no_finetune,
            dense_finetune=args.dense_finetune,
            report_path=prefix.with_name(prefix.name + "_reports.jsonl"),
        )
    plot_results(csv_path, png_path, title=title)
    print(results_table(csv_path))


if __name__ == "__main__":
    main()
