"""`FWSVDConfig`: what to compress, to which rank, and with which calibration data."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .factorize import SVD_SOLVERS
from .methods import available_methods
from .version import __version__

__all__ = ["ALLOCATIONS", "FWSVDConfig"]

logger = logging.getLogger(__name__)

# Mirrors `statistics.FISHER_ESTIMATORS` (the config does not import the estimation code).
FISHER_ESTIMATORS = ("empirical", "true", "batch")
ALLOCATIONS = ("fisher", "uniform")
DEFAULT_ALLOCATION_POWER = 0.5
BUDGET_UNITS = ("params", "bytes")
# Mirrors `factor_storage.FACTOR_DTYPES` (the config does not import torch-level storage code).
FACTOR_DTYPES = ("int8",)
# Fields that only matter while compressing; they are never written to `config.json`.
RUNTIME_FIELDS = ("calibration_dataset", "tokenizer", "importances", "importances_cache", "num_workers")


@dataclass
class FWSVDConfig(QuantizationConfigMixin):
    """Configuration of a Fisher-Weighted SVD compression; also the `quantization_config` of a compressed model.

    Give at most one of `rank`, `rank_ratio`, `param_ratio` or `param_budget` (the default is the paper's
    `rank_ratio=0.33`). See `docs/methods.md` for the methods beyond the paper.

    Args:
        rank (`int`, *optional*): The same rank for every targeted module.
        rank_ratio (`float`, *optional*): Fraction of each module's full rank ``min(in, out)`` to keep, in (0, 1).
        param_ratio (`float`, *optional*): Fraction of each module's weight parameters to keep, in (0, 1].
        param_budget (`float`, *optional*): Fraction of the targeted modules' weight parameters to keep in total, in
            (0, 1); `allocation` decides how the budget is shared between modules. Modules whose share would not pay
            off (``r * (in + out) >= in * out``) stay dense and are left out of `ranks`.
        allocation (`str`, *optional*): With `param_budget` only. `"fisher"` (the default there): global greedy
            allocation minimising the summed Fisher-weighted truncation error (needs calibration data with labels);
            `"uniform"`: every module keeps the same parameter fraction (like `param_ratio`).
        allocation_power (`float`, *optional*, defaults to 0.5): Exponent on each module's Fisher mass in the
            `"fisher"` allocation: 1 trusts the second-order loss estimate fully, 0 ignores how sensitive the loss is
            to each module (only its spectrum's shape counts). 1 starved the last layers of a real classifier at
            strong compression (see `docs/methods.md`); 0.5 is the measured default. A causal LM with no `method`
            gets the power measured for it (1.0, or 0.75 with a large calibration set, `hf_fwsvd.defaults`) unless
            this is given.
        sink_threshold (`float`, *optional*): With `param_budget` and the `"fisher"` allocation: a module stays
            dense (and counts in full against the budget) when the output energy of each calibration sequence's
            first token is on average more than this many times that of a later token. Those are the attention-sink
            activations of causal LMs, which a second-order loss estimate can undervalue. On SmolLM2-135M (six such
            `down_proj` modules at 50) it lowered the development perplexity at 80% kept with speech calibration
            (-3.2% / -1.6% with 8K / 32K tokens) but not with 131K-262K tokens of a genre mix (+0.4% / +0.2%), and
            at 60% kept with 32K tokens it raised it 3.6% (`hf_fwsvd.sinks`). Default: `None` (off); not part of the
            causal-LM default.
        first_token_weight (`float`, *optional*): The weight, in [0, 1], of each calibration sequence's first real
            token in the gradient-weighted moments of `fisher_whiten`, `kfac_whiten`, `fisher_svdllm` and
            `kfac_svdllm` (every other token keeps weight 1); `None` or 1 keeps the moments as collected. In a causal
            LM the first token is the attention sink, and in `v_proj` it carries most of the gradient weight, so the
            moment (and the module's share of a global budget) rests on one token per sequence
            (`hf_fwsvd.first_token_weight`). Needs one more pair of statistics from the same calibration pass. A
            causal LM with no `method` gets 0.1 unless this is given (`hf_fwsvd.defaults`).
        budget_unit (`str`, *optional*, defaults to `"params"`): What `param_budget` counts. `"params"`: weights.
            `"bytes"`: bytes on disk and in memory of the targeted modules' weights, as stored: a factor element costs
            1 byte with `factor_dtype="int8"` (plus one scale and zero point per row), else the model dtype's size; a
            module left dense keeps its dtype's bytes. `param_budget=0.2` with `"bytes"` on a float32 model is 20% of
            its targeted weight bytes, i.e. 80% of what dense int8 weights would take. The allocation then trades
            rank for bytes, so int8 factors reach a higher rank than float factors at the same bytes.
        factor_dtype (`str`, *optional*): Storage of the low-rank factors. `None` (the default) keeps the model
            dtype; `"int8"` stores `down` and `up` of every compressed module as per-channel weight-only int8 through
            torchao (`pip install torchao`), after splitting the singular values as ``sqrt(S)`` into both factors.
            Saved and reloaded as int8 (no dense weight, no re-quantisation). See `hf_fwsvd.factor_storage`.
        rank_multiple (`int`, *optional*): Round every resolved rank down to a multiple of this (8 or 16 suit CPU
            and GPU matmul kernels). Rounding only goes down, so it never raises a rank above the pay-off limit or the
            `param_budget`; a rank already below the multiple is kept as it is. Applies to every rank rule (`rank`,
            `rank_ratio`, `param_ratio`, `rank_pattern`, `param_budget`). Default: no rounding.
        refine_iterations (`int`, *optional*, defaults to 10): Alternating-least-squares sweeps of `method="tfwsvd"`.
        rank_pattern (`dict[str, int | float]`, *optional*): Per-module overrides. Keys are module names, name
            suffixes or regexes (fullmatch); an int value is a rank, a float a rank ratio.
        method (`str`, *optional*): A registered method (see `hf_fwsvd.methods.available_methods()`): `"fwsvd"`
            (row-wise Fisher, the paper), `"svd"` (plain SVD), `"tfwsvd"` (element-wise Fisher refinement of FWSVD),
            `"whiten"` (SVD-LLM activation whitening), `"asvd"` (activation-magnitude column scaling),
            `"fisher_whiten"` (whitening with the gradient-weighted activation second moment), `"kfac_whiten"` (its
            two-sided, Kronecker-factored form), the SVD-LLM update variants (`"svdllm"`, `"fisher_svdllm"`,
            `"kfac_svdllm"`), `"whiten_v2"`, or one added with `hf_fwsvd.methods.register_method`. See
            `docs/methods.md`. Left `None` (the default), `compress` chooses per model (see `hf_fwsvd.defaults`): for
            a causal LM `"kfac_svdllm"` with the global allocation
            (`allocation_power=1.0`, and `param_budget=0.8` when no size is given), for other models `"fwsvd"`.
        target_modules (`str | list[str]`, *optional*): A regex (fullmatch on the module name) or a list of names /
            name suffixes. Default: every linear layer inside the transformer blocks.
        modules_to_not_convert (`list[str]`, *optional*): Names, suffixes or regexes never compressed. Default:
            embeddings, output embeddings, pooler and classification heads (they are outside the blocks).
        calibration_dataset (*optional*): Task data for the Fisher: a list of strings, a list of dicts (`text`
            plus `label`/`labels`, or already tokenised `input_ids`), a `datasets.Dataset`, or a `DataLoader`.
        tokenizer (*optional*): Tokenizer for text calibration data.
        num_samples (`int`, *optional*, defaults to 256): Calibration examples to use (`None` for all).
        batch_size (`int`, *optional*, defaults to 8): Calibration batch size.
        max_length (`int`, *optional*, defaults to 128): Truncation length for text calibration data.
        importances (`dict[str, torch.Tensor] | str`, *optional*): Precomputed importances (module name -> one value
            per input feature) or the path of a safetensors file holding them; skips Fisher estimation.
        importances_cache (`str`, *optional*): Path of a safetensors file that makes a long calibration resumable: the
            statistics the method needs (the Fisher importances, activation moments, ...) that it holds are read from
            it and not collected again; the others are collected and the file rewritten with all of them (by the main
            process) before any layer is factorised, so an interrupted run restarts from it. Its directory must
            exist. Cannot be combined with `importances`.
        fisher_estimator (`str`, *optional*, defaults to `"empirical"`): How the Fisher is estimated from the
            calibration data: `"empirical"` (squared per-example gradients on the given labels, the paper),
            `"batch"` (squared gradients of each batch-mean loss, what common FWSVD code computes; depends on
            `batch_size`) or `"true"` (labels drawn from the model's own predictions: no labels needed).
        importance_floor (`float`, *optional*, defaults to 0): Relative floor on importances (see `factorize`); 0 gives
            the exact weighted optimum.
        svd_solver (`str`, *optional*, defaults to `"auto"`): `"full"` (exact SVD), `"randomized"` (randomized range
            finder) or `"auto"` (randomized only for large matrices at low ranks, where its extra error was measured
            to be negligible; see `factorize.choose_svd_solver`).
        num_workers (`int`, *optional*, defaults to 1): Threads that factorise modules side by side in `compress` and
            compress-on-load, each with one torch thread (the process's torch thread count is restored after the
            call). The result equals a serial run with one torch thread (bit for bit on most CPUs; to float rounding
            where LAPACK depends on memory alignment). Not saved in `config.json`.
        ranks (`dict[str, int]`, *optional*): The resolved rank of every compressed module. Filled in by compression
            and saved in `config.json`, so a reload builds exact shapes before reading any weight.
        source_classes (`dict[str, str]`, *optional*): Original class of modules that were not `nn.Linear`
            (GPT-2's `Conv1D`), so a dense export restores them.
        weights_file (`str`, *optional*): Name of the weights file (or shard index) of a saved checkpoint. FWSVD
            checkpoints do not use `model.safetensors`, so transformers without hf_fwsvd fails instead of silently
            loading random weights into the compressed layers.
        hf_fwsvd_version (`str`, *optional*): Version of hf_fwsvd that wrote the checkpoint.
        base_model (`str`, *optional*): The dense model that was compressed (a Hub id or a local path). Filled in from
            the model's `name_or_path` by compression unless given; the model card's `base_model` comes from it.
    """

    quant_method: str = "fwsvd"
    rank: int | None = None
    rank_ratio: float | None = None
    param_ratio: float | None = None
    param_budget: float | None = None
    allocation: str | None = None
    allocation_power: float | None = None
    sink_threshold: float | None = None
    first_token_weight: float | None = None
    budget_unit: str = "params"
    factor_dtype: str | None = None
    rank_multiple: int | None = None
    refine_iterations: int = 10
    rank_pattern: dict[str, int | float] = field(default_factory=dict)
    method: str | None = None
    target_modules: str | list[str] | None = None
    modules_to_not_convert: list[str] | None = None
    calibration_dataset: Any = None
    tokenizer: Any = None
    num_samples: int | None = 256
    batch_size: int = 8
    max_length: int = 128
    importances: Any = None
    importances_cache: str | None = None
    importance_floor: float = 0.0
    fisher_estimator: str = "empirical"
    svd_solver: str = "auto"
    num_workers: int = 1
    ranks: dict[str, int] | None = None
    source_classes: dict[str, str] = field(default_factory=dict)
    weights_file: str | None = None
    hf_fwsvd_version: str = __version__
    base_model: str | None = None

    def __post_init__(self) -> None:
        self.quant_method = "fwsvd"
        given = [
            name for name in ("rank", "rank_ratio", "param_ratio", "param_budget") if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"Give only one of `rank`, `rank_ratio`, `param_ratio` and `param_budget`; got {', '.join(given)}."
            )
        # whether the size is the paper's default (a causal LM with no method then gets a budget, see `defaults`)
        self.size_defaulted = not given and self.ranks is None
        if self.size_defaulted:
            self.rank_ratio = 0.33
        # likewise for the allocation power: a causal LM with no method gets the measured one unless it was given
        self.allocation_power_defaulted = self.allocation_power is None
        if self.allocation_power_defaulted:
            self.allocation_power = DEFAULT_ALLOCATION_POWER
        if self.rank is not None:
            _check_rank(self.rank, "rank")
        if self.rank_ratio is not None:
            _check_fraction(self.rank_ratio, "rank_ratio", inclusive=False)
        if self.param_ratio is not None:
            _check_fraction(self.param_ratio, "param_ratio", inclusive=True)
        if self.param_budget is not None:
            _check_fraction(self.param_budget, "param_budget", inclusive=False)
            if self.allocation is None:
                self.allocation = "fisher"
            if self.rank_pattern:
                raise ValueError(
                    "`rank_pattern` cannot be combined with `param_budget`: the allocation sets every rank."
                )
        if self.allocation is not None:
            if self.param_budget is None and self.ranks is None:
                raise ValueError(f"`allocation={self.allocation!r}` needs `param_budget=` (a fraction of parameters).")
            if self.allocation not in ALLOCATIONS:
                raise ValueError(f"Unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}.")
        if self.budget_unit not in BUDGET_UNITS:
            raise ValueError(f"Unknown budget_unit {self.budget_unit!r}; choose one of {', '.join(BUDGET_UNITS)}.")
        if self.budget_unit == "bytes" and self.param_budget is None and self.ranks is None:
            raise ValueError('`budget_unit="bytes"` needs `param_budget=` (the fraction of weight bytes to keep).')
        if self.factor_dtype is not None:
            if self.factor_dtype not in FACTOR_DTYPES:
                raise ValueError(
                    f"Unknown factor_dtype {self.factor_dtype!r}; choose one of {', '.join(FACTOR_DTYPES)}, or None "
                    "to keep the model dtype."
                )
            from .factor_storage import require_torchao

            require_torchao()
        _check_rank(self.refine_iterations, "refine_iterations")
        if self.rank_multiple is not None:
            _check_rank(self.rank_multiple, "rank_multiple")
        _check_rank(self.num_workers, "num_workers")
        if isinstance(self.allocation_power, bool) or not isinstance(self.allocation_power, (int, float)):
            raise ValueError(f"`allocation_power` must be a float in [0, 1], got {self.allocation_power!r}.")
        if not 0 <= self.allocation_power <= 1:
            raise ValueError(f"`allocation_power` must be in [0, 1], got {self.allocation_power}.")
        if self.sink_threshold is not None:
            if isinstance(self.sink_threshold, bool) or not isinstance(self.sink_threshold, (int, float)):
                raise ValueError(f"`sink_threshold` must be a number above 1, got {self.sink_threshold!r}.")
            if not self.sink_threshold > 1:
                raise ValueError(
                    f"`sink_threshold` must be above 1 (a ratio of mean token energies), got {self.sink_threshold}."
                )
            if self.ranks is None and (self.param_budget is None or self.allocation != "fisher"):
                raise ValueError(
                    "`sink_threshold` keeps modules dense inside the global allocation; pass `param_budget=` with "
                    'allocation="fisher" (the default there).'
                )
        if self.first_token_weight is not None:
            weight = self.first_token_weight
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
                raise ValueError(f"`first_token_weight` must be a number in [0, 1], got {weight!r}.")
        for key, value in self.rank_pattern.items():
            if isinstance(value, float):
                _check_fraction(value, f"rank_pattern[{key!r}]", inclusive=False)
            else:
                _check_rank(value, f"rank_pattern[{key!r}]")
        if self.method is not None and self.method not in available_methods():  # registered later: accepted too
            raise ValueError(f"Unknown method {self.method!r}; choose one of {', '.join(available_methods())}.")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("`target_modules` is an empty list: nothing would be compressed.")
        _check_patterns(self.target_modules, "target_modules")
        _check_patterns(self.modules_to_not_convert, "modules_to_not_convert")
        for key in self.rank_pattern:  # every key is also tried as a regex (see `ranks._override`)
            _check_patterns(key, "rank_pattern")
        for name in ("num_samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if self.fisher_estimator not in FISHER_ESTIMATORS:
            raise ValueError(
                f"Unknown fisher_estimator {self.fisher_estimator!r}; choose one of {', '.join(FISHER_ESTIMATORS)}."
            )
        if self.svd_solver not in SVD_SOLVERS:
            raise ValueError(f"Unknown svd_solver {self.svd_solver!r}; choose one of {', '.join(SVD_SOLVERS)}.")
        if not 0 <= self.importance_floor < 1:
            raise ValueError(f"`importance_floor` must be in [0, 1), got {self.importance_floor!r}.")
        if isinstance(self.importances, (str, os.PathLike)) and not os.path.isfile(self.importances):
            raise ValueError(f"`importances` file {os.fspath(self.importances)!r} does not exist.")
        if self.importances_cache is not None:
            if self.importances is not None:
                raise ValueError(
                    "Give either `importances` (precomputed) or `importances_cache` (estimate once, then reuse), not "
                    "both."
                )
            self.importances_cache = os.fspath(self.importances_cache)
            if os.path.isdir(self.importances_cache):
                raise ValueError(
                    f"`importances_cache` {self.importances_cache!r} is a directory; it must be a file path, e.g. "
                    f"{os.path.join(self.importances_cache, 'importances.safetensors')!r}."
                )
            parent = os.path.dirname(os.path.abspath(self.importances_cache))
            if not os.path.isdir(parent):
                raise ValueError(
                    f"`importances_cache` {self.importances_cache!r} is in a directory that does not exist; create "
                    f"{parent!r} first."
                )
        if self.ranks is not None:
            for key, value in self.ranks.items():
                _check_rank(value, f"ranks[{key!r}]")

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: runtime-only fields (datasets, tokenizers, importances) are left out."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for name in RUNTIME_FIELDS:
            data.pop(name)
        data["quant_method"] = self.quant_method
        return data

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build a config from a dict; keys this version does not know are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in config_dict.items() if k != "quant_method"}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(
                "Ignoring FWSVDConfig keys unknown to hf_fwsvd %s: %s (written by hf_fwsvd %s; upgrade to use them).",
                __version__,
                ", ".join(unknown),
                config_dict.get("hf_fwsvd_version", "unknown"),
            )
        config = cls(**{k: v for k, v in data.items() if k in known})
        unused = {}
        for key, value in kwargs.items():
            if key in known:
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    def copy_for_run(self) -> FWSVDConfig:
        """A copy to fill in during compression, sharing (not copying) the dataset, tokenizer and importances."""
        clone = copy.copy(self)
        clone.rank_pattern = dict(self.rank_pattern)
        clone.source_classes = dict(self.source_classes)
        clone.ranks = None if self.ranks is None else dict(self.ranks)
        clone.hf_fwsvd_version = __version__ if self.ranks is None else self.hf_fwsvd_version
        return clone

    @property
    def is_compressed(self) -> bool:
        """Whether this config describes an already-compressed checkpoint (it has a resolved rank map)."""
        return self.ranks is not None


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registered method names (kept for code that imported the old constant)
        return available_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_rank(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be a positive int, got {value!r} ({type(value).__name__}).")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value}.")


def _check_fraction(value: Any, name: str, inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a float, got {value!r}.")
    upper_ok = value <= 1 if inclusive else value < 1
    if not (value > 0 and upper_ok):
        bound = "(0, 1]" if inclusive else "(0, 1)"
        raise ValueError(f"`{name}` must be in {bound}, got {value}.")


_REGEX_CHARS = "*+?[]()|\\^$"


def _check_patterns(patterns: Any, name: str) -> None:
    """Module-name patterns are a regex string or a list of names / suffixes / regexes; reject anything else early."""
    if patterns is None:
        return
    if isinstance(patterns, str):
        items = [patterns]
    elif isinstance(patterns, (list, tuple, set)) and all(isinstance(item, str) for item in patterns):
        items = [item for item in patterns if any(char in item for char in _REGEX_CHARS)]
    else:
        raise ValueError(
            f"`{name}` must be a regex string or a list of module names, got {patterns!r} ({type(patterns).__name__})."
        )
    for item in items:
        try:
            re.compile(item)
        except re.error as error:
            raise ValueError(f"`{name}` pattern {item!r} is not a valid regular expression: {error}.") from error
