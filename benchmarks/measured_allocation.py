"""The global allocation driven by measured per-module sensitivity, as in ASVD's ratio search (issue #16).

The library's allocation (`hf_fwsvd.allocation`) scores the directions of each module by a proxy: the squared
singular values of the method's weighted matrix, rescaled to the module's diagonal-Fisher mass. ASVD (Yuan et al.
2023) instead *measures* each module's sensitivity: the calibration perplexity with that one module truncated to a
few ratios, everything else dense. This script does the same and feeds the measurement to our allocator:

1. ``--measure``: for every target module and every kept fraction in `KEPT_FRACTIONS` (0 = the module zeroed), the
   increase of the mean next-token loss on the first `SENSITIVITY_CHUNKS` chunks of the genre-mix *calibration* set
   when only that module is replaced by the method's truncated factorisation. The input of every block is cached
   once, so a module in block ``l`` costs a forward of blocks ``l..L-1`` only. One JSON line per module is appended
   to ``--curves`` (resumable; ``--shard i/n`` splits the modules over processes).
2. The measured points, with zero loss increase at the break-even rank (the module kept dense), become direction
   scores (`curve_scores`): the lower convex hull of ``(rank, loss increase)``, whose drop from rank ``k - 1`` to
   ``k`` scores direction ``k`` (non-increasing, as the allocator expects). The allocator then minimises the summed
   measured loss increase under the budget, like ASVD's search but with marginal costs instead of one threshold.
3. The remaining arguments run `benchmarks.causal_lm` with that allocation in place of the proxy
   (`measured_allocation`), e.g. ``--runs fisher_whiten+alloc1+update+mix@0.8``.

``--rule threshold`` uses ASVD's own rule on the same measurements instead (`threshold_allocation`): one
sensitivity threshold, bisected until the budget holds; every module takes its smallest measured rank whose loss
increase is below the threshold, or stays dense. ``--additivity BUDGET`` prints, for the proxy and both rules, the
summed single-module increases the curves predict next to the whole compressed model's increase.

Example (the statistics cache as in the allocation screen)::

    PYTHONPATH=src:. python benchmarks/measured_allocation.py --measure --curves /tmp/curves.jsonl \
        --method fisher_whiten --stats-cache /tmp/h16-calib-stats
    PYTHONPATH=src:. python benchmarks/measured_allocation.py --curves /tmp/curves.jsonl -- --csv /tmp/screen.csv \
        --skip-references --stats-cache /tmp/h16-calib-stats --runs fisher_whiten+alloc1+update+mix@0.8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import hf_fwsvd.pipeline as pipeline
from hf_fwsvd.allocation import allocate_ranks
from hf_fwsvd.factorize import full_rank, low_rank_params
from hf_fwsvd.ranks import round_rank

logger = logging.getLogger(__name__)

KEPT_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
RULES = ("greedy", "threshold")
SENSITIVITY_CHUNKS = 8
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def break_even_rank(shape: tuple[int, int]) -> float:
    """The rank at which ``r (in + out)`` reaches ``in out`` (the module is then kept dense)."""
    out_features, in_features = shape
    return out_features * in_features / (out_features + in_features)


def rank_for_fraction(shape: tuple[int, int], fraction: float) -> int:
    """The rank keeping `fraction` of the module's weights (0 for a zeroed module)."""
    return 0 if fraction == 0 else max(1, int(fraction * break_even_rank(shape)))


def lower_convex_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The vertices of the lower convex hull of `points`, sorted by the first coordinate."""
    hull: list[tuple[float, float]] = []
    for x, y in sorted(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) <= 0:  # the middle point lies on or above the chord
                hull.pop()
            else:
                break
        hull.append((x, y))
    return hull


def curve_values(shape: tuple[int, int], points: list[tuple[int, float]]) -> torch.Tensor:
    """The predicted loss increase ``f(r)`` at every rank ``r = 0 .. min(out, in)`` from measured points of one
    module.

    The points are clipped at 0, joined by ``(break-even rank, 0)`` (the dense module loses nothing) and replaced by
    their lower convex hull ``f``, a convex non-increasing piecewise-linear function of the rank, 0 from the
    break-even rank on. Ranks below the smallest measured one follow the hull's first segment.

    Args:
        shape (`tuple[int, int]`): ``(out_features, in_features)``.
        points (`list[tuple[int, float]]`): Measured ``(rank, loss increase)``, ranks below the break-even rank.

    Raises:
        `ValueError`: When no point is given or a rank is not below the break-even rank.
    """
    end = break_even_rank(shape)
    if not points:
        raise ValueError("No measured points: cannot score the directions.")
    for rank, _ in points:
        if not 0 <= rank < end:
            raise ValueError(f"Measured rank {rank} is outside [0, {end:.1f}) (the break-even rank).")
    # every y is >= 0 and the last vertex is (end, 0), so the convex hull is non-increasing
    hull = lower_convex_hull([(float(r), max(0.0, float(d))) for r, d in points] + [(end, 0.0)])
    xs = torch.tensor([x for x, _ in hull], dtype=torch.float64)
    ys = torch.tensor([y for _, y in hull], dtype=torch.float64)
    ranks = torch.arange(full_rank(shape) + 1, dtype=torch.float64)
    return _interpolate(ranks.clamp(max=end), xs, ys).clamp_min(0.0)


def curve_scores(shape: tuple[int, int], points: list[tuple[int, float]]) -> torch.Tensor:
    """Direction scores (length ``min(out, in)``): direction ``k`` scores ``f(k - 1) - f(k)`` for the `curve_values`
    ``f`` (non-increasing, 0 from the break-even rank on, where the allocator turns the module dense)."""
    values = curve_values(shape, points)
    return torch.cummin((values[:-1] - values[1:]).clamp_min(0.0), 0).values


def predicted_increase(
    shapes: dict[str, tuple[int, int]], curves: dict[str, list[tuple[int, float]]], ranks: dict[str, int]
) -> float:
    """The summed `curve_values` of every module at its rank (0 for a module missing from `ranks`, kept dense): the
    loss increase the measurements predict if the modules' effects added up."""
    return sum(
        float(curve_values(shape, curves[name])[ranks[name]]) for name, shape in shapes.items() if name in ranks
    )


def _interpolate(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through ``(xs, ys)``, extrapolating the first segment to the left."""
    if len(xs) == 1:
        return torch.full_like(x, float(ys[0]))
    segment = (torch.searchsorted(xs, x, right=True) - 1).clamp(0, len(xs) - 2)
    x0, x1, y0, y1 = xs[segment], xs[segment + 1], ys[segment], ys[segment + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Module name -> measured ``(rank, loss increase)`` points, from the JSON lines of `--measure`."""
    curves = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            curves[row["module"]] = [(int(rank), float(delta)) for rank, delta in row["points"]]
    return curves


def threshold_allocation(
    shapes: dict[str, tuple[int, int]], curves: dict[str, list[tuple[int, float]]], param_budget: float
) -> tuple[dict[str, int], list[str]]:
    """ASVD's rule: the smallest sensitivity threshold whose choices fit ``param_budget`` of the modules' weights.

    The measured ``(module, rank, loss increase)`` with a rank above 0 are sorted by loss increase; taking the first
    ``n`` of them, every module gets the smallest rank among its taken points (dense when none is taken). The kept
    weights fall as ``n`` grows, so the smallest ``n`` that fits is found by bisection.

    Returns:
        `(ranks, dense)`: the rank of every factorised module and the modules left dense.

    Raises:
        `ValueError`: When even every measured point taken does not fit the budget.
    """
    points = sorted(
        (delta, name, rank) for name in shapes for rank, delta in curves[name] if rank > 0
    )  # fmt: skip
    budget = math.floor(param_budget * sum(out * inp for out, inp in shapes.values()))

    def choose(count: int) -> tuple[dict[str, int], int]:
        ranks: dict[str, int] = {}
        for _, name, rank in points[:count]:
            ranks[name] = min(rank, ranks.get(name, rank))
        kept = sum(
            low_rank_params(*shape, ranks[n]) if n in ranks else shape[0] * shape[1] for n, shape in shapes.items()
        )
        return ranks, kept

    low, high = 0, len(points)
    if choose(high)[1] > budget:
        raise ValueError(f"`param_budget={param_budget}` is below what the smallest measured ranks keep.")
    while low < high:
        middle = (low + high) // 2
        if choose(middle)[1] <= budget:
            high = middle
        else:
            low = middle + 1
    ranks, _ = choose(low)
    return ranks, sorted(set(shapes) - set(ranks))


@contextlib.contextmanager
def measured_allocation(curves: dict[str, list[tuple[int, float]]], rule: str = "greedy") -> Iterator[None]:
    """Inside the block, `compress`'s global allocation (``param_budget``) uses the measured curves instead of the
    Fisher-mass proxy; restored on exit.

    Args:
        curves (`dict[str, list[tuple[int, float]]]`): Module name -> measured ``(rank, loss increase)``.
        rule (`str`, *optional*, defaults to `"greedy"`): `"greedy"` (our allocator on `curve_scores`) or
            `"threshold"` (ASVD's rule, `threshold_allocation`; weight budgets only).

    Raises:
        `ValueError` (on use): When a target module has no measured curve.
    """
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {RULES}, got {rule!r}.")
    saved = pipeline.budget_ranks

    def budget_ranks(weights, shapes, config, stats, dtypes=None):
        if config.allocation == "uniform":
            return saved(weights, shapes, config, stats, dtypes)
        missing = sorted(set(shapes) - set(curves))
        if missing:
            raise ValueError(
                f"No measured sensitivity for {len(missing)} module(s), e.g. `{missing[0]}`; measure them first."
            )
        if rule == "threshold":
            if config.budget_unit != "params":
                raise ValueError('`rule="threshold"` supports `budget_unit="params"` only.')
            chosen, dense = threshold_allocation(shapes, curves, config.param_budget)
        else:
            scores = {name: curve_scores(shape, curves[name]) for name, shape in shapes.items()}
            costs = pipeline.budget_costs(shapes, config, dtypes)
            allocation = allocate_ranks(shapes, scores, config.param_budget, costs)
            chosen, dense = allocation.ranks, allocation.dense
        return {name: round_rank(rank, config.rank_multiple) for name, rank in chosen.items()}, dense

    pipeline.budget_ranks = budget_ranks
    try:
        yield
    finally:
        pipeline.budget_ranks = saved


def block_of(name: str) -> int:
    match = _BLOCK.search(name)
    if match is None:
        raise ValueError(f"`{name}` is not inside a numbered block (`.layers.<i>.`).")
    return int(match.group(1))


class BlockInputs:
    """The input of every decoder block on fixed token ids, so that a change inside block ``l`` is measured by
    running blocks ``l..L-1`` only (`loss_from`)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor) -> None:
        self.model, self.input_ids = model, input_ids
        self.layers = model.model.layers
        self.inputs: list[torch.Tensor] = [None] * len(self.layers)

        def keep(index):
            def hook(module, args, kwargs):
                self.inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

            return hook

        handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                self.dense_loss = float(model(input_ids=input_ids, labels=input_ids).loss)
        finally:
            for handle in handles:
                handle.remove()

    def loss_from(self, block: int) -> float:
        """The mean next-token loss when blocks ``block..L-1`` run on the cached input of `block`."""
        try:
            self.model.model.layers = self.layers[block:]
            with torch.no_grad():
                return float(self.model(inputs_embeds=self.inputs[block], labels=self.input_ids).loss)
        finally:
            self.model.model.layers = self.layers


def measure_module(
    cache: BlockInputs,
    module: nn.Linear,
    name: str,
    truncate: Callable[[torch.Tensor, int], torch.Tensor],
    fractions: tuple[float, ...] = KEPT_FRACTIONS,
) -> list[tuple[int, float]]:
    """``(rank, loss increase)`` for each kept fraction, only `module` replaced by ``truncate(weight, rank)``."""
    weight = module.weight.data
    shape = tuple(weight.shape)
    points = []
    try:
        for fraction in fractions:
            rank = rank_for_fraction(shape, fraction)
            module.weight.data = torch.zeros_like(weight) if rank == 0 else truncate(weight, rank).to(weight.dtype)
            points.append((rank, cache.loss_from(block_of(name)) - cache.dense_loss))
    finally:
        module.weight.data = weight
    return points


def _setup(args: argparse.Namespace) -> tuple:
    """The dense model, its targets, the method's statistics on the genre mix, the mix and the measured token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.assets import smollm2_dir
    from benchmarks.causal_lm import StatisticsStore, benchmark_texts, needed_statistics, parse_setting
    from hf_fwsvd import FWSVDConfig
    from hf_fwsvd.targets import find_target_modules

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    data = benchmark_texts(tokenizer)
    targets = find_target_modules(model, FWSVDConfig(method="svd", rank=1))
    spec = parse_setting(f"{args.method}+alloc1+mix")
    store = StatisticsStore(model, tokenizer, targets, directory, args.stats_cache)
    stats, _ = store.get(data["mix_calibration"], needed_statistics(spec, 0.8))
    chunks = data["mix_calibration"][:SENSITIVITY_CHUNKS]
    input_ids = torch.tensor([chunk["input_ids"] for chunk in chunks])
    return model, tokenizer, targets, stats, data["mix_calibration"], input_ids


def measure(args: argparse.Namespace) -> None:
    from hf_fwsvd import FWSVDConfig
    from hf_fwsvd.methods import get_method

    model, _, targets, stats, _, input_ids = _setup(args)
    method = get_method(args.method)
    config = FWSVDConfig(method=args.method, param_ratio=0.5)

    def truncate(name):
        return lambda weight, rank: method.factorize(weight, rank, name, stats, config).product()

    cache = BlockInputs(model, input_ids)
    logger.info("dense calibration loss %.4f on %d tokens", cache.dense_loss, input_ids.numel())
    done = set(read_curves(args.curves)) if args.curves.exists() else set()
    index, count = args.shard
    names = [name for position, name in enumerate(targets) if position % count == index and name not in done]
    for position, name in enumerate(names):
        started = time.perf_counter()
        points = measure_module(cache, targets[name], name, truncate(name))
        with args.curves.open("a") as file:
            file.write(json.dumps({"module": name, "tokens": input_ids.numel(), "dense_loss": cache.dense_loss,
                                   "method": args.method, "points": points}) + "\n")  # fmt: skip
        logger.info("[%d/%d] %s: %s (%.0f s)", position + 1, len(names), name,
                    ", ".join(f"r{r} {d:+.4f}" for r, d in points), time.perf_counter() - started)  # fmt: skip


def additivity(args: argparse.Namespace) -> None:
    """Print, for the proxy and both measured allocations at ``--additivity`` (the method alone, no update step),
    the summed single-module loss increases the curves predict next to the loss increase of the whole compressed
    model, on the measured tokens."""
    from benchmarks.causal_lm import CHUNK_TOKENS
    from hf_fwsvd import FWSVDConfig, compress

    model, tokenizer, targets, stats, calibration, input_ids = _setup(args)
    curves = read_curves(args.curves)
    shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
    with torch.no_grad():
        dense_loss = float(model(input_ids=input_ids, labels=input_ids).loss)
    config = FWSVDConfig(method=args.method, param_budget=args.additivity, allocation_power=1.0,
                         calibration_dataset=calibration, tokenizer=tokenizer, batch_size=4, max_length=CHUNK_TOKENS,
                         num_samples=None)  # fmt: skip
    print(f"| allocation at {args.additivity:.0%} kept, {args.method}, no update | predicted (sum) | measured | "
          "modules dense |\n|---|---|---|---|")  # fmt: skip
    for label, rule in (("Fisher-mass proxy (default)", None), ("measured, greedy", "greedy"),
                        ("measured, threshold (ASVD)", "threshold")):  # fmt: skip
        compressed = copy.deepcopy(model)
        with measured_allocation(curves, rule) if rule else contextlib.nullcontext():
            compress(compressed, config, statistics=stats, show_progress=False)
        ranks = compressed.config.quantization_config.ranks
        with torch.no_grad():
            increase = float(compressed(input_ids=input_ids, labels=input_ids).loss) - dense_loss
        predicted = predicted_increase(shapes, curves, ranks)
        print(f"| {label} | {predicted:.4f} | {increase:.4f} | {len(shapes) - len(ranks)} |", flush=True)
        del compressed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curves", type=Path, required=True, help="JSON lines of measured points")
    parser.add_argument("--measure", action="store_true", help="measure the curves (appending to --curves)")
    parser.add_argument("--method", default="fisher_whiten", help="the factorisation measured")
    parser.add_argument(
        "--additivity",
        type=float,
        default=None,
        metavar="BUDGET",
        help="compare predicted and measured loss increases of the allocations at this budget",
    )
    parser.add_argument("--rule", choices=RULES, default="greedy", help="how the measurements become ranks")
    parser.add_argument("--stats-cache", type=Path, default=None)
    parser.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1),
                        help="i/n: measure every n-th module starting at i")  # fmt: skip
    parser.add_argument("causal_lm_args", nargs=argparse.REMAINDER, help="after `--`: benchmarks/causal_lm.py's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if args.measure:
        measure(args)
        return
    if args.additivity is not None:
        additivity(args)
        return
    from benchmarks.causal_lm import main as causal_lm_main

    rest = args.causal_lm_args[1:] if args.causal_lm_args[:1] == ["--"] else args.causal_lm_args
    with measured_allocation(read_curves(args.curves), args.rule):
        causal_lm_main(rest)


if __name__ == "__main__":
    main()
