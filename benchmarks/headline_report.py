"""Tables, paired tests and the plot of the results of `benchmarks/headline.py` (run with ``--report``).

Paired tests use the per-example test predictions written next to ``points.csv``:

* accuracy, one seed: McNemar's exact test on the examples only one of the two models gets right;
* accuracy, several seeds (calibration samples): per example ``d_i = mean over seeds of correct(method) -
  correct(svd)`` and a sign-flip permutation test of ``mean d_i`` (10,000 draws; the unit is the test example, the
  calibration randomness is averaged); over several tasks, the statistic is the mean over tasks of the per-task
  means, with the signs flipped per example;
* Pearson r (regression): paired bootstrap over test examples (10,000 resamples);
* over all tasks, classification and regression together (``mean over tasks of score(method) - score(svd)``, points
  of accuracy or of Pearson r x 100): paired bootstrap, test examples resampled within each task.

POS tagging is scored per word (token accuracy); its paired tests treat words as the unit, which ignores that words
of one line are correlated (the p-values are optimistic for that task).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.assets import TASKS, TOKEN_TASKS, task_splits
from benchmarks.headline import RESULTS, read_points, test_labels

DRAWS = 10_000


def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """``(only a right, only b right, exact two-sided p)``."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return only_a, only_b, p


def sign_flip_p(per_task: list[torch.Tensor], draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """``(statistic, two-sided p)`` of the mean over tasks of the mean per-example difference, sign-flip test."""
    observed = sum(float(d.mean()) for d in per_task) / len(per_task)
    generator = torch.Generator().manual_seed(seed)
    null = torch.zeros(draws, dtype=torch.float64)
    for d in per_task:
        signs = torch.randint(0, 2, (draws, d.numel()), generator=generator, dtype=torch.int8).double() * 2 - 1
        null += (signs * d.double()).mean(1) / len(per_task)
    p = (int((null.abs() >= abs(observed) - 1e-12).sum()) + 1) / (draws + 1)
    return observed, p


def bootstrap_pearson(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, draws: int = DRAWS) -> tuple[float, float]:
    """``(r(a) - r(b), two-sided bootstrap p)`` on paired resamples of test examples."""

    def r(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pc, tc = pred - pred.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True)
        return (pc * tc).sum(-1) / (pc.square().sum(-1).sqrt() * tc.square().sum(-1).sqrt())

    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(y), (draws, len(y)), generator=generator)
    diffs = r(a[idx], y[idx]) - r(b[idx], y[idx])
    observed = float(r(a, y) - r(b, y))
    p = 2 * min(float((diffs <= 0).double().mean()), float((diffs >= 0).double().mean()))
    return observed, min(1.0, p)


def bootstrap_tasks(per_task: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]], draws: int = DRAWS):
    """``(mean over tasks of score(a) - score(b), two-sided bootstrap p)``; each task ``(a, b, y, regression)``.

    Scores are accuracy (``a``, ``b`` per-example correctness, averaged over seeds) or Pearson r (``a``, ``b``
    predictions); test examples are resampled with replacement within each task, the same resample for a and b.
    """
    generator = torch.Generator().manual_seed(0)
    total, observed = torch.zeros(draws, dtype=torch.float64), 0.0
    for a, b, y, regression in per_task:
        idx = torch.randint(0, len(y), (draws, len(y)), generator=generator)
        if regression:

            def r(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                pc, tc = pred - pred.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True)
                return (pc * tc).sum(-1) / (pc.square().sum(-1).sqrt() * tc.square().sum(-1).sqrt())

            total += r(a[idx], y[idx]) - r(b[idx], y[idx])
            observed += float(r(a, y) - r(b, y))
        else:
            total += (a - b)[idx].mean(-1)
            observed += float((a - b).mean())
    n = len(per_task)
    p = 2 * min(float((total <= 0).double().mean()), float((total >= 0).double().mean()))
    return observed / n, min(1.0, p)


def format_bootstrap_p(p: float) -> str:
    """A bootstrap p-value as printed: ``< 1/DRAWS`` when no resample crossed zero."""
    return f"{p:.3g}" if p > 0 else f"< {1 / DRAWS:g}"


def load_predictions(task: str) -> dict[str, list]:
    path = RESULTS / f"{task}_predictions.jsonl"
    if not path.is_file():
        return {}
    return {row["key"]: row["pred"] for row in map(json.loads, path.read_text().splitlines())}


def _fmt(values: list[float], scale: float = 100) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def is_headline_point(r: dict) -> bool:
    """fp32 with the headline calibration: the empirical Fisher on 128 examples (SVD and dense have neither)."""
    return r["int8"] == "0" and r["estimator"] in ("", "empirical") and r["num_samples"] in ("", "128")


def seed0_scores(rows: list[dict], task: str, method: str, ratio: str, stage: str) -> list[float]:
    """Scores of the headline points at calibration seed 0 (SVD's and dense's seed is ``""``)."""
    return [
        float(r["score"])
        for r in rows
        if r["task"] == task
        and r["method"] == method
        and r["ratio"] == ratio
        and r["stage"] == stage
        and r["seed"] in ("0", "")
        and is_headline_point(r)
    ]


def finetune_stages(rows: list[dict]) -> list[str]:
    """The recovery fine-tune stages (``finetune_<objective>_<steps>_<lr>``) in the order they first appear."""
    return list(dict.fromkeys(r["stage"] for r in rows if r["stage"].startswith("finetune_")))


def main() -> None:
    rows = read_points()
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    by = defaultdict(list)
    for r in rows:
        by[(r["task"], r["method"], r["estimator"], r["num_samples"], r["ratio"], r["stage"], r["int8"])].append(r)
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "dense"}, key=float)
    methods = [m for m in ("svd", "fwsvd", "tfwsvd", "whiten", "kfac_whiten") if any(r["method"] == m for r in rows)]

    def cell(task, method, ratio, stage="none", estimator=None, num_samples=None, int8="0"):
        estimator = estimator if estimator is not None else ("" if method == "svd" else "empirical")
        keys = [k for k in by if k[0] == task and k[1] == method and k[2] == estimator and k[4] == ratio]
        keys = [k for k in keys if k[5] == stage and k[6] == int8]
        if num_samples is not None:
            keys = [k for k in keys if k[3] == str(num_samples)]
        elif method != "svd":
            keys = [k for k in keys if k[3] == "128"]
        return [float(r["score"]) for k in keys for r in by[k]]

    def dense_scores(task):
        """The dense task model's test scores, without fine-tune or int8."""
        return [
            float(r["score"])
            for k, v in by.items()
            if k[0] == task and k[1] == "dense" and k[5:7] == ("none", "0")
            for r in v
        ]

    print("## Test scores (x100), mean ± std over calibration seeds; no fine-tune\n")
    print("| task | dense | rank ratio | block weights kept | " + " | ".join(methods) + " |")
    print("|---|---|---|---|" + "---|" * len(methods))
    for task in tasks:
        dense = dense_scores(task)
        for ratio in ratios:
            kept = [r["block_kept"] for r in rows if r["task"] == task and r["ratio"] == ratio and r["block_kept"]]
            cells = [_fmt(cell(task, m, ratio)) for m in methods]
            if not any(cells):
                continue
            print(f"| {task} | {_fmt(dense)} | {ratio} | {kept[0] if kept else ''} | " + " | ".join(cells) + " |")

    print("\n## Paired tests against SVD (no fine-tune)\n")
    print("| task | rank ratio | method | seeds | mean diff (pt) | test | p |")
    print("|---|---|---|---|---|---|---|")
    pooled: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
    pooled_all: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    pooled_names: dict[tuple[str, str], list[str]] = defaultdict(list)
    for task in tasks:
        predictions = load_predictions(task)
        regression = TASKS[task][0] == 1
        test = task_splits(task)["test"]
        for ratio in ratios:
            svd_key = f"{task}|svd|||{ratio}||none|0"
            if svd_key not in predictions:
                continue
            y = test_labels(task, test).double()[: len(predictions[svd_key])]
            svd = torch.tensor(predictions[svd_key], dtype=torch.float64)
            for method in methods[1:]:
                keys = [k for k in predictions if k.startswith(f"{task}|{method}|empirical|128|{ratio}|")]
                keys = [k for k in keys if k.endswith("|none|0")]
                if not keys:
                    continue
                preds = torch.tensor([predictions[k] for k in keys], dtype=torch.float64)
                pooled_names[(ratio, method)].append(task)
                if regression:
                    pooled_all[(ratio, method)].append((preds.mean(0), svd, y, True))
                    diff, p = bootstrap_pearson(preds.mean(0), svd, y)
                    print(
                        f"| {task} | {ratio} | {method} | {len(keys)} | {100 * diff:+.1f} (r) | bootstrap | "
                        f"{format_bootstrap_p(p)} |"
                    )
                    continue
                d = (preds == y).double().mean(0) - (svd == y).double()
                pooled[(ratio, method)].append(d)
                pooled_all[(ratio, method)].append(((preds == y).double().mean(0), (svd == y).double(), y, False))
                stat, p = sign_flip_p([d])
                test_name = "sign-flip" if len(keys) > 1 else "McNemar"
                if len(keys) == 1:
                    _, _, p = mcnemar((preds[0] == y).tolist(), (svd == y).tolist())
                print(f"| {task} | {ratio} | {method} | {len(keys)} | {100 * stat:+.1f} | {test_name} | {p:.3g} |")
    print("\n## Averaged over the classification tasks (each task weighted equally)\n")
    print("| rank ratio | method | tasks | mean diff vs SVD (pt) | sign-flip p |")
    print("|---|---|---|---|---|")
    for (ratio, method), per_task in sorted(pooled.items()):
        stat, p = sign_flip_p(per_task)
        print(f"| {ratio} | {method} | {len(per_task)} | {100 * stat:+.2f} | {p:.3g} |")
    print("\n## Averaged over all tasks, accuracy and Pearson r (x100) alike (each task weighted equally)\n")
    print("| rank ratio | method | tasks | mean diff vs SVD (pt) | paired bootstrap p |")
    print("|---|---|---|---|---|")
    for (ratio, method), per_task in sorted(pooled_all.items()):
        stat, p = bootstrap_tasks(per_task)
        names = ", ".join(pooled_names[(ratio, method)])
        shown = format_bootstrap_p(p)
        print(f"| {ratio} | {method} | {len(per_task)} ({names}) | {100 * stat:+.2f} | {shown} |")
        task_names = pooled_names[(ratio, method)]
        sentence = [t for t, name in zip(per_task, task_names, strict=True) if name not in TOKEN_TASKS]
        if 1 < len(sentence) < len(per_task):  # the same without the token task(s): the sentence-level tasks only
            stat, p = bootstrap_tasks(sentence)
            shown = format_bootstrap_p(p)
            names = ", ".join(n for n in task_names if n not in TOKEN_TASKS)
            print(f"| {ratio} | {method} | {len(sentence)} ({names}) | {100 * stat:+.2f} | {shown} |")

    recovery = [k for k in by if k[5] == "recovery"]
    if recovery:
        print("\n## After the recovery (head refit), seed 0 (x100)\n")
        print("| task | dense | rank ratio | " + " | ".join(f"{m} / + recovery" for m in methods) + " |")
        print("|---|---|---|" + "---|" * len(methods))
        for task in tasks:
            dense = dense_scores(task)
            for ratio in sorted({k[4] for k in recovery if k[0] == task}, key=float):
                cells = []
                for m in methods:
                    seed0 = seed0_scores(rows, task, m, ratio, "none")
                    rec = cell(task, m, ratio, stage="recovery")
                    cells.append(f"{_fmt(seed0)} / {_fmt(rec)}")
                print(f"| {task} | {_fmt(dense)} | {ratio} | " + " | ".join(cells) + " |")

    finetune_table(rows, tasks, methods)
    pair_tests_at_every_seed(rows, tasks, "tfwsvd", ["fwsvd", "whiten"])
    pair_tests_at_every_seed(rows, tasks, "kfac_whiten", ["whiten", "tfwsvd", "fwsvd"])

    estimators = sorted({k[2] for k in by if k[2] not in ("", "empirical")})
    counts = sorted({k[3] for k in by if k[3] not in ("", "128")}, key=int)
    if estimators or counts:
        print("\n## Fisher estimators and calibration sizes (fwsvd, no fine-tune, x100)\n")
        variants = [("empirical", "128")] + [(e, "128") for e in estimators] + [("empirical", c) for c in counts]
        print("| task | rank ratio | svd | " + " | ".join(f"{e} n={n}" for e, n in variants) + " |")
        print("|---|---|---|" + "---|" * len(variants))
        for task in tasks:
            for ratio in sorted(
                {k[4] for k in by if k[0] == task and k[2] in estimators or k[3] in counts}, key=float
            ):
                cells = [_fmt(cell(task, "fwsvd", ratio, estimator=e, num_samples=n)) for e, n in variants]
                print(f"| {task} | {ratio} | {_fmt(cell(task, 'svd', ratio))} | " + " | ".join(cells) + " |")

    int8 = [k for k in by if k[6] == "1"]
    if int8:
        print("\n## Dynamic int8 (x100, seed 0)\n")
        print("| task | model | score | score, int8 |")
        print("|---|---|---|---|")
        for task in tasks:
            for k in sorted(k for k in int8 if k[0] == task):
                fp32 = by.get(k[:6] + ("0",), [])
                seed0 = [float(r["score"]) for r in fp32 if r["seed"] in ("0", "")]
                name = "dense" if k[1] == "dense" else f"{k[1]} {k[4]}"
                print(f"| {task} | {name} | {_fmt(seed0)} | {_fmt([float(r['score']) for r in by[k]])} |")
    timing = RESULTS / "timing.json"
    if timing.is_file():
        print("\n## Forward time and size (side by side, one run)\n")
        print("| model | forward s (min of rounds) | vs dense | saved MB |")
        print("|---|---|---|---|")
        data = json.loads(timing.read_text())
        dense_s = data["models"]["dense"]["seconds"]
        for name, v in data["models"].items():
            print(f"| {name} | {v['seconds']:.2f} | {dense_s / v['seconds']:.2f}x faster | {v['mb']:.1f} |")
    plot(rows, tasks, methods)


def finetune_table(rows: list[dict], tasks: list[str], methods: list[str]) -> None:
    """A table per recovery fine-tune recipe (stage ``finetune_*``), seed 0: no fine-tune / head refit / fine-tune."""

    for stage in sorted(finetune_stages(rows)):
        _, objective, steps, learning_rate = stage.split("_")
        print(f"\n## Recovery fine-tune `{stage}` ({objective}, {steps} steps, lr {learning_rate}), seed 0\n")
        print("Each cell: no fine-tune / head refit / fine-tune (x100); dense: as built / after the same fine-tune.\n")
        print("| task | dense | rank ratio | block weights kept | " + " | ".join(methods) + " |")
        print("|---|---|---|---|" + "---|" * len(methods))
        for task in tasks:
            done = [r for r in rows if r["task"] == task and r["stage"] == stage and r["method"] != "dense"]
            as_built, tuned_dense = (seed0_scores(rows, task, "dense", "1.0", s) for s in ("none", stage))
            dense = f"{_fmt(as_built)} / {_fmt(tuned_dense) or '-'}"
            for ratio in sorted({r["ratio"] for r in done}, key=float):
                kept = next(r["block_kept"] for r in done if r["ratio"] == ratio)
                cells = []
                for m in methods:
                    tuned = seed0_scores(rows, task, m, ratio, stage)
                    stages = [seed0_scores(rows, task, m, ratio, before) for before in ("none", "recovery")] + [tuned]
                    cells.append(" / ".join(_fmt(v) or "-" for v in stages) if tuned else "")
                print(f"| {task} | {dense} | {ratio} | {kept} | " + " | ".join(cells) + " |")
        finetune_tests(tasks, methods, stage)
        finetune_seed_tests(tasks, methods, stage)
        if "whiten" in methods:
            pair_tests_at_every_seed(rows, tasks, "kfac_whiten", ["whiten"], stage)
            pair_tests_at_every_seed(rows, tasks, "tfwsvd", ["whiten", "kfac_whiten", "fwsvd"], stage)


class PairedTests:
    """Rows of paired tests, one per ``(task, ratio, label)``: McNemar on accuracy, paired bootstrap on Pearson r;
    printed with the `bootstrap_tasks` average of every ``(ratio, label)`` run on two or more tasks."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.pooled: dict[tuple[str, str], list[tuple]] = defaultdict(list)
        self.names: dict[tuple[str, str], list[str]] = defaultdict(list)

    def add(
        self,
        task: str,
        ratio: str,
        label: str,
        pred: torch.Tensor,
        base: torch.Tensor,
        y: torch.Tensor,
        regression: bool,
    ) -> None:
        """The row ``| task | ratio | label | pred minus base | test | p |``, and the pair pooled over tasks."""
        self.names[(ratio, label)].append(task)
        if regression:
            diff, p = bootstrap_pearson(pred, base, y)
            self.pooled[(ratio, label)].append((pred, base, y, True))
            self.lines.append(
                f"| {task} | {ratio} | {label} | {100 * diff:+.1f} (r) | bootstrap | {format_bootstrap_p(p)} |"
            )
            return
        right, base_right = (pred == y).double(), (base == y).double()
        self.pooled[(ratio, label)].append((right, base_right, y, False))
        only, only_base, p = mcnemar(right.bool().tolist(), base_right.bool().tolist())
        diff = 100 * float((right - base_right).mean())
        self.lines.append(f"| {task} | {ratio} | {label} | {diff:+.1f} | McNemar {only}/{only_base} | {p:.3g} |")

    def print(self, title: str, columns: str) -> None:
        """`title`, the table (``columns`` names the label and difference columns) and the task means; nothing when
        no row was added."""
        if not self.lines:
            return
        print(title)
        print(f"| task | rank ratio | {columns} | test | p |")
        print("|---|---|---|---|---|---|")
        print("\n".join(self.lines))
        print_task_means(self.pooled, self.names)


def finetune_tests(tasks: list[str], methods: list[str], stage: str) -> None:
    """Paired tests of every method against SVD after the same fine-tune (seed 0), per task and averaged over tasks
    (McNemar / paired bootstrap of Pearson r; the average by `bootstrap_tasks`)."""
    table = PairedTests()
    for task in tasks:
        predictions = load_predictions(task)
        regression = TASKS[task][0] == 1
        # SVD's seed-0 fine-tune only (its seed field is empty); `finetune_seed_tests` pairs the other seeds
        svd_keys = sorted(k for k in predictions if k.startswith(f"{task}|svd|||") and k.endswith(f"||{stage}|0"))
        labels = test_labels(task, task_splits(task)["test"]).double() if svd_keys else None
        for svd_key in svd_keys:
            ratio = svd_key.split("|")[4]
            svd = torch.tensor(predictions[svd_key], dtype=torch.float64)
            y = labels[: len(svd)]
            for method in methods[1:]:
                key = f"{task}|{method}|empirical|128|{ratio}|0|{stage}|0"
                if key not in predictions:
                    continue
                pred = torch.tensor(predictions[key], dtype=torch.float64)
                table.add(task, ratio, method, pred, svd, y, regression)
    table.print(f"\nPaired tests against SVD after `{stage}` (seed 0):\n", "method | diff (pt)")


def method_pair_tests(tasks: list[str], method: str, others: list[str], seed: str = "0", stage: str = "none") -> None:
    """Paired tests of `method` against each of `others` at the same calibration seed and `stage` (``"none"``: no
    fine-tune; a ``finetune_*`` stage: both after that fine-tune), wherever both were run: McNemar / paired bootstrap
    of Pearson r per task, `bootstrap_tasks` over the tasks."""
    table = PairedTests()
    for task in tasks:
        predictions = load_predictions(task)
        regression = TASKS[task][0] == 1
        prefix = f"{task}|{method}|empirical|128|"
        keys = sorted(k for k in predictions if k.startswith(prefix) and k.endswith(f"|{seed}|{stage}|0"))
        labels = test_labels(task, task_splits(task)["test"]).double() if keys else None
        for key in keys:
            ratio = key.split("|")[4]
            pred = torch.tensor(predictions[key], dtype=torch.float64)
            y = labels[: len(pred)]
            for other in others:
                other_key = key.replace(f"|{method}|", f"|{other}|", 1)
                if other_key not in predictions:
                    continue
                base = torch.tensor(predictions[other_key], dtype=torch.float64)
                table.add(task, ratio, other, pred, base, y, regression)
    when = "no fine-tune" if stage == "none" else f"both after `{stage}`"
    title = f"\n## {method} against the other methods ({when}, calibration seed {seed})\n"
    table.print(title, f"against | {method} minus it (pt)")


def pair_tests_at_every_seed(
    rows: list[dict], tasks: list[str], method: str, others: list[str], stage: str = "none"
) -> None:
    """`method_pair_tests` at every calibration seed `method` has a row for at `stage`."""
    for seed in sorted({r["seed"] for r in rows if r["method"] == method and r["stage"] == stage}):
        method_pair_tests(tasks, method, others, seed, stage)


def print_task_means(pooled: dict, names: dict, empty_cells: int = 0) -> None:
    """One table row per ``(ratio, method)`` pooled over two or more tasks: the mean difference against SVD and its
    `bootstrap_tasks` p-value, after `empty_cells` blank columns."""
    for (ratio, method), per_task in sorted(pooled.items()):
        if len(per_task) > 1:
            stat, p = bootstrap_tasks(per_task)
            label = f"mean of {len(per_task)} ({', '.join(names[(ratio, method)])})"
            blanks = "| " * empty_cells
            shown = format_bootstrap_p(p)
            print(f"| {label} | {ratio} | {method} | {blanks}{100 * stat:+.2f} | bootstrap | {shown} |")


def finetune_seed_tests(tasks: list[str], methods: list[str], stage: str) -> None:
    """Every method against SVD after the same fine-tune at every seed both have (printed when some pair has two or
    more): mean +- std of each over the seeds, and the paired test of the per-example score averaged over the seeds
    (sign-flip for accuracy, paired bootstrap for Pearson r; over tasks `bootstrap_tasks`). An `svd` row's seed is
    its fine-tune seed ("" for 0); another method's is its calibration seed, which its fine-tune also uses."""
    lines, pooled, names, several = [], defaultdict(list), defaultdict(list), False
    for task in tasks:
        predictions = load_predictions(task)
        regression = TASKS[task][0] == 1
        labels = None
        for ratio in sorted({k.split("|")[4] for k in predictions if k.endswith(f"|{stage}|0")}, key=float):
            svd = {
                key.split("|")[5] or "0": predictions[key]
                for key in predictions
                if key.startswith(f"{task}|svd|||{ratio}|") and key.endswith(f"|{stage}|0")
            }
            for method in methods[1:]:
                prefix = f"{task}|{method}|empirical|128|{ratio}|"
                seeds = sorted(
                    k[len(prefix) :].split("|")[0]
                    for k in predictions
                    if k.startswith(prefix) and k.endswith(f"|{stage}|0")
                )
                seeds = [s for s in seeds if svd.get(s) is not None]
                if not seeds:
                    continue
                several |= len(seeds) > 1
                labels = labels if labels is not None else test_labels(task, task_splits(task)["test"]).double()
                ours = torch.tensor([predictions[f"{prefix}{s}|{stage}|0"] for s in seeds], dtype=torch.float64)
                theirs = torch.tensor([svd[s] for s in seeds], dtype=torch.float64)
                y = labels[: ours.shape[1]]
                names[(ratio, method)].append(task)
                if regression:
                    score = [float(torch.corrcoef(torch.stack([p, y]))[0, 1]) for p in ours]
                    base = [float(torch.corrcoef(torch.stack([p, y]))[0, 1]) for p in theirs]
                    diff, p = bootstrap_pearson(ours.mean(0), theirs.mean(0), y)
                    pooled[(ratio, method)].append((ours.mean(0), theirs.mean(0), y, True))
                    test, shown = "bootstrap", format_bootstrap_p(p)
                else:
                    right, svd_right = (ours == y).double(), (theirs == y).double()
                    score, base = right.mean(1).tolist(), svd_right.mean(1).tolist()
                    diff, p = sign_flip_p([right.mean(0) - svd_right.mean(0)])
                    pooled[(ratio, method)].append((right.mean(0), svd_right.mean(0), y, False))
                    test, shown = "sign-flip", f"{p:.3g}"
                lines.append(
                    f"| {task} | {ratio} | {method} | {','.join(seeds)} | {_fmt(base)} | {_fmt(score)} | "
                    f"{100 * diff:+.1f}{' (r)' if regression else ''} | {test} | {shown} |"
                )
    if not several:
        return
    print(f"\nAfter `{stage}` at every seed both have (mean ± std over seeds; paired test on the seed-averaged "
          "per-example score):\n")  # fmt: skip
    print("| task | rank ratio | method | seeds | SVD + ft | method + ft | diff (pt) | test | p |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print_task_means(pooled, names, empty_cells=3)


def plot_stages(rows: list[dict]) -> list[str]:
    """``["none"]``, plus the recovery fine-tune stage with the most points (the first such, on a tie) if any."""
    counts = defaultdict(int)
    for r in rows:
        counts[r["stage"]] += 1
    finetunes = finetune_stages(rows)
    return ["none"] + ([max(finetunes, key=counts.get)] if finetunes else [])


def plot(rows: list[dict], tasks: list[str], methods: list[str]) -> None:
    """``headline.png``: score against block weights kept, mean ± std over seeds, one panel per task.

    The top row is without fine-tuning (dense = the task model as built); the bottom row is after the recovery
    fine-tune with the most points (dense = the task model given the same fine-tune), where one was run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tasks:
        return
    stages = plot_stages(rows)
    fig, axes = plt.subplots(
        len(stages), len(tasks), figsize=(4.2 * len(tasks), 3.6 * len(stages)), dpi=100, squeeze=False
    )
    colors = {
        "svd": "tab:red",
        "fwsvd": "tab:blue",
        "tfwsvd": "tab:purple",
        "whiten": "tab:green",
        "kfac_whiten": "tab:pink",
    }
    for row_axes, stage in zip(axes, stages, strict=True):
        when = "no fine-tune" if stage == "none" else "after the fine-tune"
        for ax, task in zip(row_axes, tasks, strict=True):
            sub = [r for r in rows if r["task"] == task and r["stage"] == stage and is_headline_point(r)]
            dense = [float(r["score"]) for r in sub if r["method"] == "dense"]
            for method in methods:
                pts = defaultdict(list)
                for r in sub:
                    if r["method"] == method and is_headline_point(r):
                        pts[float(r["block_kept"])].append(float(r["score"]))
                if not pts:
                    continue
                xs = sorted(pts)
                means = [statistics.fmean(pts[x]) for x in xs]
                errs = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0 for x in xs]
                ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, color=colors[method], label=method)
            if dense:
                ax.axhline(dense[0], color="black", linestyle="--", label="dense")
            if not sub:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"all-mpnet-base-v2: {task}, {when}", fontsize=9)
            ax.set_xlabel("fraction of block weights kept")
            ax.set_ylabel(f"test {TASKS[task][2]}")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "headline.png")
    print(f"\nPlot: {RESULTS / 'headline.png'}")


if __name__ == "__main__":
    main()
