"""Which statistics a config needs, and where they come from: precomputed `importances`, the resumable
`importances_cache`, or one calibration pass over `calibration_dataset` for whatever is still missing."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..calibration import calibration_loader_from_config
from ..distributed import is_main_process
from ..first_token_weight import first_token_parts
from ..importances import check_importances, load_importances
from ..replace import shape_of
from ..sinks import FIRST_TOKEN_OUTPUT_ENERGY
from ..statistics import Statistics, collect, get_statistic
from ..statistics.cache import cache_fisher_estimator, load_statistics_cache, save_statistics_cache
from .registry import get_method

__all__ = ["check_statistics", "collect_statistics", "known_statistics", "required_statistics"]

logger = logging.getLogger(__name__)

ROW_FISHER = "row_fisher"


def required_statistics(config: Any) -> tuple[str, ...]:
    """The statistics `config` needs: its method's, plus the row Fisher for the Fisher rank allocation (and the
    first-token output energy for its `sink_threshold`, the first-token parts of its moments for its
    `first_token_weight`)."""
    method = get_method(config.method)
    needed = list(method.statistics)
    needed += first_token_parts(method.name, method.statistics, getattr(config, "first_token_weight", None))
    allocated = config.param_budget is not None and config.allocation == "fisher"
    if allocated and ROW_FISHER not in needed:
        needed.append(ROW_FISHER)
    if allocated and getattr(config, "sink_threshold", None) is not None:
        needed.append(FIRST_TOKEN_OUTPUT_ENERGY)
    return tuple(needed)


def known_statistics(
    config: Any, targets: dict[str, nn.Module], statistics: tuple[str, ...] | None = None
) -> Statistics:
    """The needed statistics available without calibration: the row Fisher from `config.importances`, and whatever
    `config.importances_cache` holds (checked against `targets`).

    Raises:
        `ValueError`: When the importances or the cache do not fit `targets` (the message names the cache file).
    """
    needed = required_statistics(config) if statistics is None else tuple(statistics)
    in_features = {name: shape_of(module)[1] for name, module in targets.items()}
    stats = Statistics()
    if config.importances is not None and ROW_FISHER in needed:
        importances = load_importances(config.importances)
        check_importances(importances, in_features)
        stats[ROW_FISHER] = importances
    cache = getattr(config, "importances_cache", None)
    if cache is None or not os.path.isfile(cache):
        return stats
    cached = load_statistics_cache(cache)
    reused = [key for key in needed if key not in stats and key in cached]
    _check_cache_estimator(config, cache, [key for key in reused if get_statistic(key).needs_backward])
    for key in reused:
        try:
            if key == ROW_FISHER:
                check_importances(cached[key], in_features)
            elif cached.missing(key, targets):
                missing = cached.missing(key, targets)
                raise ValueError(
                    f"`{key}` is missing for {len(missing)} targeted module(s), e.g. `{missing[0]}`: it was computed "
                    "for another model or other target modules."
                )
        except ValueError as error:
            raise ValueError(
                f"{error} They were read from `importances_cache` {cache!r}: delete it to re-estimate."
            ) from error
        stats[key] = cached[key]
    if reused:
        logger.info("Reusing %s saved in %s; their estimation is skipped.", ", ".join(reused), cache)
    return stats


def _check_cache_estimator(config: Any, cache: str, reused: list[str]) -> None:
    """Refuse gradient statistics from a cache estimated with another Fisher estimator than `config`'s."""
    if not reused:
        return
    wanted = getattr(config, "fisher_estimator", "empirical")
    recorded = cache_fisher_estimator(cache)
    if recorded is None:
        if wanted != "empirical":
            raise ValueError(
                f"`importances_cache` {cache!r} does not record the Fisher estimator of its {', '.join(reused)} (it "
                f"was written by an older version or is a plain importances file), and fisher_estimator={wanted!r} "
                "was asked for: delete it to re-estimate, or pass it as `importances=` to use it as it is."
            )
        logger.warning(
            "`importances_cache` %s does not record its Fisher estimator (written by an older version); reusing its "
            "%s as fisher_estimator='empirical', the only estimator before it was recorded.",
            cache,
            ", ".join(reused),
        )
    elif recorded != wanted:
        raise ValueError(
            f"`importances_cache` {cache!r} holds {', '.join(reused)} estimated with fisher_estimator={recorded!r}, "
            f"but this run asks for fisher_estimator={wanted!r}: delete the file (or use another path) to "
            "re-estimate, or set fisher_estimator to match it."
        )


def collect_statistics(
    model: nn.Module,
    config: Any,
    targets: dict[str, nn.Module],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
    statistics: tuple[str, ...] | None = None,
    collector: Callable[..., Statistics] = collect,
) -> Statistics:
    """The calibration statistics `config` needs for `targets` (none for plain SVD with a fixed rank rule).

    Precomputed `config.importances` supply the row Fisher; statistics found in `config.importances_cache` are
    reused (see [`known_statistics`]); everything else is collected in one pass over the calibration data (see
    [`~hf_fwsvd.statistics.collect`]) and, with `importances_cache`, saved there by the main process (together with
    what the cache already held) before any layer is factorised.

    Args:
        model (`nn.Module`): The dense model (`targets` are its modules).
        config ([`FWSVDConfig`]): Supplies the method, calibration data and importances options.
        targets (`dict[str, nn.Module]`): Targeted modules.
        loss_fn (`Callable`, *optional*): Calibration loss `loss_fn(model, batch)`; defaults to the model's loss.
        show_progress (`bool`, *optional*, defaults to `True`): Progress bar over calibration batches.
        statistics (`tuple[str, ...]`, *optional*): Collect these instead of what `config` needs.
        collector (`Callable`, *optional*, defaults to [`~hf_fwsvd.statistics.collect`]): The calibration pass,
            called as ``collector(model, batches, targets, names, loss_fn, show_progress, fisher_estimator=...)``
            (`compress_layerwise` passes its block-by-block pass).

    Returns:
        [`Statistics`] restricted to the needed statistics and `targets`.
    """
    needed = required_statistics(config) if statistics is None else tuple(statistics)
    stats = known_statistics(config, targets, needed)
    missing = [key for key in needed if key not in stats]
    if missing:
        loader = calibration_loader_from_config(config, model)
        estimator = getattr(config, "fisher_estimator", "empirical")
        fresh = collector(model, loader, targets, missing, loss_fn, show_progress, fisher_estimator=estimator)
        stats.update(fresh)
        stats.samples = fresh.samples
        cache = getattr(config, "importances_cache", None)
        if cache is not None and is_main_process():
            merged = load_statistics_cache(cache) if os.path.isfile(cache) else Statistics()
            merged.update({key: stats[key] for key in needed})
            # the estimator of the gradient statistics in the file: this run's when it estimated some, else the old
            fresh_backward = any(get_statistic(key).needs_backward for key in missing)
            recorded = estimator if fresh_backward else cache_fisher_estimator(cache)
            save_statistics_cache(merged, cache, fisher_estimator=recorded)
            logger.info("Saved the calibration statistics to %s; a restarted run will reuse them.", cache)
    if ROW_FISHER in stats:
        check_importances(stats[ROW_FISHER], {name: shape_of(module)[1] for name, module in targets.items()})
    result = stats.subset(needed, targets)
    result.samples = stats.samples
    return result


def check_statistics(config: Any, stats: Statistics, targets: dict[str, nn.Module]) -> None:
    """Raise a `ValueError` when precomputed `stats` lack what `config` needs for some target."""
    for key in required_statistics(config):
        missing = stats.missing(key, targets)
        if missing:
            raise ValueError(
                f"The given statistics lack `{key}` for {len(missing)} targeted module(s), e.g. `{missing[0]}`, "
                f"which method={config.method!r} (allocation={config.allocation!r}) needs. Collect them with "
                "`hf_fwsvd.methods.collect_statistics` for this config, or do not pass `statistics=`."
            )
