"""The compression pipeline every entry point runs: targets -> ranks/allocation -> statistics -> factorise -> replace
-> refine -> report.

`compress` runs it on a model in memory ([`compress_model`]); `compress_layerwise` runs the same steps on a checkpoint
block by block (its statistics come from the model loaded once, possibly offloaded). The method-specific parts come
from the registry (`hf_fwsvd.methods`): which statistics to collect, the importance that weighs allocation scores and
the report, the factorisation of one weight, and an optional model-level refinement.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import ModuleCost, allocate_ranks, direction_scores
from .calibration import calibration_loader_from_config, calibration_token_count
from .defaults import apply_large_calibration_defaults, resolve_defaults
from .factor_storage import INT8_STORAGE, factor_element_bytes, quantize_factors, storage_bytes
from .factorize import LowRankFactors, low_rank_params, relative_errors, weighted_matrix
from .first_token_weight import reweigh_first_token
from .layers import LowRankLinear, dense_weight
from .methods import CompressionMethod, check_statistics, collect_statistics, get_method
from .payoff import low_rank_pays_off
from .progress import progress_bars
from .provenance import source_name
from .ranks import rank_for_param_ratio, resolve_ranks, round_rank
from .replace import shape_of
from .report import CompressionReport, ModuleReport
from .sinks import log_sink_modules, sink_modules
from .statistics import Statistics
from .targets import find_target_modules

__all__ = [
    "budget_costs",
    "budget_ranks",
    "calibration_size",
    "compress_model",
    "factorize_weight",
    "fisher_mass",
    "module_report",
    "new_report",
    "overrides_refine_model",
    "weighted_matrix",
]

logger = logging.getLogger(__name__)


def fisher_mass(weight: torch.Tensor, importance: torch.Tensor) -> float:
    """``sum_oi F_i W_oi^2``: the diagonal-Fisher estimate of the loss increase if the module were zeroed."""
    dense = weight.detach().to(torch.float32)
    return float((dense.square().sum(0) * importance.to(torch.float32).to(dense.device)).sum())


def budget_costs(
    shapes: dict[str, tuple[int, int]], config: Any, dtypes: dict[str, torch.dtype]
) -> dict[str, ModuleCost] | None:
    """What each module costs under `config.budget_unit`: `None` for weights (the allocation's default), else bytes.

    In bytes, a direction costs ``(in + out)`` factor elements (1 byte each for int8 factors, else the model dtype's
    size) plus, for int8, the scale and zero point of its `down` row; an int8 `up` adds one scale and zero point per
    output row whatever the rank; a module left dense costs ``in out`` elements of its dtype.
    """
    if config.budget_unit != "bytes":
        return None
    costs = {}
    for name, (out_features, in_features) in shapes.items():
        dense_bytes = torch.empty((), dtype=dtypes[name]).element_size()
        element = factor_element_bytes(config.factor_dtype, dtypes[name])
        row = dense_bytes + 1 if config.factor_dtype == "int8" else 0  # scale + int8 zero point per row
        costs[name] = ModuleCost(
            direction=(out_features + in_features) * element + row,
            dense=out_features * in_features * dense_bytes,
            fixed=out_features * row,
        )
    return costs


def budget_ranks(
    weights: Iterable[tuple[str, torch.Tensor]],
    shapes: dict[str, tuple[int, int]],
    config: Any,
    stats: Statistics,
    dtypes: dict[str, torch.dtype] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Ranks under `config.param_budget`: the same fraction everywhere, or the global Fisher allocation.

    Args:
        weights (`Iterable[tuple[str, torch.Tensor]]`): ``(name, dense weight)`` of every target, read lazily (only
            the Fisher allocation reads them).
        shapes (`dict[str, tuple[int, int]]`): Module name -> ``(out_features, in_features)``.
        config ([`FWSVDConfig`]): `param_budget`, `allocation`, `allocation_power`, `sink_threshold`, `method`,
            `importance_floor`, `budget_unit`, `factor_dtype`.
        stats ([`Statistics`]): Holds `row_fisher` for the Fisher allocation and the method's statistics (and
            `first_token_output_energy` for `config.sink_threshold`).
        dtypes (`dict[str, torch.dtype]`, *optional*): Module name -> weight dtype (needed for `budget_unit="bytes"`).

    Returns:
        `(ranks, dense)`: the rank of every factorised module and the modules left dense.
    """
    if config.budget_unit == "bytes" and (config.allocation == "uniform" or dtypes is None):
        raise ValueError(
            '`budget_unit="bytes"` works with the global allocation (`allocation="fisher"`) of `compress` only; use '
            '`budget_unit="params"` with `allocation="uniform"` or `compress_layerwise`.'
        )
    if config.allocation == "uniform":
        ranks = {name: rank_for_param_ratio(*shape, config.param_budget, name) for name, shape in shapes.items()}
        return {name: round_rank(rank, config.rank_multiple) for name, rank in ranks.items()}, []
    method = get_method(config.method)
    scores = {}
    for name, weight in weights:
        mass = fisher_mass(weight, stats["row_fisher"][name]) ** config.allocation_power
        scores[name] = direction_scores(method.weighted_matrix(name, weight, stats, config), mass)
    keep_dense = sink_modules(stats, config.sink_threshold)
    log_sink_modules(stats, keep_dense, config.sink_threshold)
    costs = budget_costs(shapes, config, dtypes)
    allocation = allocate_ranks(shapes, scores, config.param_budget, costs, keep_dense=keep_dense)
    return {name: round_rank(rank, config.rank_multiple) for name, rank in allocation.ranks.items()}, allocation.dense


def factorize_weight(
    method: CompressionMethod, weight: torch.Tensor, rank: int, name: str, stats: Statistics, config: Any
) -> tuple[LowRankFactors, torch.Tensor | None]:
    """Factorise one weight with `method`; returns float32 factors and the importance (for the report)."""
    return method.factorize(weight, rank, name, stats, config), method.importance(name, stats)


def module_report(
    name: str, weight: torch.Tensor, approximation: torch.Tensor, importance: torch.Tensor | None, rank: int
) -> ModuleReport:
    """The report row of one factorised module: shape, rank, parameters and plain / weighted relative errors."""
    errors = relative_errors(weight, approximation, importance)
    out_features, in_features = weight.shape
    return ModuleReport(
        name=name,
        out_features=out_features,
        in_features=in_features,
        rank=rank,
        params_before=out_features * in_features,
        params_after=low_rank_params(out_features, in_features, rank),
        plain_error=errors["plain"],
        weighted_error=errors["weighted"],
        pays_off=low_rank_pays_off(out_features, in_features, rank),
    )


def calibration_size(config: Any) -> int | None:
    """How many calibration examples `config` uses (`None` when its data has no length)."""
    data = config.calibration_dataset
    if data is None or not hasattr(data, "__len__"):
        return None
    size = len(data.dataset) if hasattr(data, "dataset") and hasattr(data.dataset, "__len__") else len(data)
    return size if config.num_samples is None else min(size, config.num_samples)


def new_report(
    config: Any, params_before: int, dense_modules: list[str], stats: Statistics | None = None
) -> CompressionReport:
    """An empty report for a run of `config` (calibration size recorded for methods that read data; with `stats`,
    the dense modules kept as attention sinks under `config.sink_threshold`)."""
    report = CompressionReport(method=config.method, model_params_before=params_before)
    report.dense_modules = list(dense_modules)
    if stats is not None and dense_modules:
        report.sink_modules = [name for name in sink_modules(stats, config.sink_threshold) if name in dense_modules]
    if get_method(config.method).needs_data and config.importances is None:
        report.calibration_samples = calibration_size(config)
    return report


def overrides_refine_model(method: CompressionMethod) -> bool:
    """Whether `method` has a model-level refinement step (then it cannot run block by block)."""
    return type(method).refine_model is not CompressionMethod.refine_model


def _check_materialised(targets: dict[str, nn.Module]) -> None:
    for name, module in targets.items():
        if dense_weight(module).device.type == "meta":
            raise ValueError(
                f"`{name}` has its weight on the meta device (offloaded to disk or CPU by `device_map`). `compress` "
                "must hold every dense weight: for a model that does not fit, use `hf_fwsvd.compress_layerwise` on "
                "its checkpoint folder (it estimates the Fisher with the same device_map and factorises block by "
                "block from disk), or load the model without offloading."
            )


def _count_params(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def compress_model(
    model: nn.Module,
    config: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
    statistics: Statistics | None = None,
) -> tuple[Any, CompressionReport]:
    """Run the pipeline on `model` in memory: every target becomes a [`LowRankLinear`].

    On any failure (including an interrupt, during factorisation or refinement) every replaced module is put back,
    so the model is left unchanged.

    Args:
        model (`nn.Module`): A dense model.
        config ([`FWSVDConfig`]): What to compress and how; not modified.
        loss_fn (`Callable`, *optional*): Calibration loss `loss_fn(model, batch)`.
        show_progress (`bool`, *optional*, defaults to `True`): Progress bars.
        statistics ([`Statistics`], *optional*): Statistics already collected on this dense model.

    Returns:
        `(run_config, report)`: a filled-in copy of `config` (`ranks`, `source_classes`, `base_model`) and the
        [`CompressionReport`].
    """
    run_config = resolve_defaults(model, config.copy_for_run())
    method = get_method(run_config.method)
    targets = find_target_modules(model, run_config)
    _check_materialised(targets)
    shapes = {name: shape_of(module) for name, module in targets.items()}
    ranks = resolve_ranks(shapes, run_config) if run_config.param_budget is None else None
    if statistics is None:
        stats = collect_statistics(model, run_config, targets, loss_fn, show_progress)
    else:
        check_statistics(run_config, statistics, targets)
        stats = statistics
    stats = reweigh_first_token(stats, run_config.first_token_weight)
    if config.method is None and run_config.calibration_dataset is not None:
        apply_large_calibration_defaults(run_config, lambda: calibration_token_count(run_config, model))
        method = get_method(run_config.method)
    dense_modules: list[str] = []
    if ranks is None:
        weights = ((name, dense_weight(module)) for name, module in targets.items())
        dtypes = {name: dense_weight(module).dtype for name, module in targets.items()}
        ranks, dense_modules = budget_ranks(weights, shapes, run_config, stats, dtypes)
    report = new_report(run_config, _count_params(model), dense_modules, stats)
    swapped: list[str] = []
    importances: dict[str, torch.Tensor | None] = {}
    jobs = [(name, module) for name, module in targets.items() if name in ranks]

    def factorise(job: tuple[str, nn.Module]) -> tuple[LowRankFactors, torch.Tensor | None]:
        name, module = job
        return factorize_weight(method, dense_weight(module), ranks[name], name, stats, run_config)

    try:
        with _worker_threads(run_config.num_workers) as pool:
            results = pool.map(factorise, jobs) if pool is not None else map(factorise, jobs)
            progress = tqdm(total=len(jobs), desc="Factorising", unit="layer", disable=not show_progress)
            for (name, module), (factors, importance) in zip(jobs, results, strict=True):
                weight = dense_weight(module)
                replacement = LowRankLinear.from_factors(
                    factors, module.bias, dtype=weight.dtype, device=weight.device, name=name
                )
                if type(module).__name__ != "Linear":
                    run_config.source_classes[name] = type(module).__name__
                model.set_submodule(name, replacement)
                swapped.append(name)
                importances[name] = importance
                progress.update()
            progress.close()
        if overrides_refine_model(method):
            batches = None
            if run_config.calibration_dataset is not None:
                batches = calibration_loader_from_config(run_config, model)
            with progress_bars(show_progress):
                method.refine_model(model, list(swapped), batches, run_config)
        if run_config.factor_dtype is not None:
            quantize_factors(model, swapped)
    except BaseException:
        # Never leave a partially compressed model behind: put every dense module back (they are still in `targets`).
        for name in swapped:
            model.set_submodule(name, targets[name])
        raise
    for name in swapped:
        weight = dense_weight(targets[name])
        report.modules.append(
            module_report(name, weight, model.get_submodule(name).weight, importances[name], ranks[name])
        )
    report.factor_storage = INT8_STORAGE if run_config.factor_dtype == "int8" else None
    for name in swapped:
        report.module_bytes_before += sum(storage_bytes(param) for param in targets[name].parameters())
        report.module_bytes_after += sum(storage_bytes(param) for param in model.get_submodule(name).parameters())
    run_config.ranks = ranks
    run_config.base_model = run_config.base_model or _source_name(model)
    report.base_model = run_config.base_model
    report.model_params_after = _count_params(model)
    return run_config, report


@contextlib.contextmanager
def _worker_threads(num_workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """A pool of `num_workers` threads that factorise modules side by side, each with one torch thread; `None` (run
    serially, with the caller's thread settings) for one worker.

    Two workers of one torch thread each factorised MiniLM 1.8-1.9x faster than one torch thread on two cores, and
    more torch threads did not help (`benchmarks/bench_factorize.py`). The process-wide torch thread count is set to 1
    for the pool's lifetime and restored on exit, also on errors and interrupts (pending factorisations are cancelled).
    The result equals a serial run with one torch thread (each module's factorisation is deterministic and
    independent of the others): bit for bit on most CPUs, to float rounding on those where LAPACK depends on memory
    alignment (seen on an AMD EPYC).
    """
    if num_workers <= 1:
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="fwsvd-factorise")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _source_name(model: nn.Module) -> str | None:
    """Where the dense model came from: its Hub id, or ``"./<folder name>"`` (see `provenance.source_name`)."""
    return source_name(getattr(getattr(model, "config", None), "_name_or_path", None) or None)
