"""Which modules of a model get compressed: target matching in the style of peft."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from .config import FWSVDConfig
from .layers import LowRankLinear, is_supported_linear

__all__ = ["DEFAULT_MODULES_TO_NOT_CONVERT", "find_target_modules", "matches"]

# Heads and embeddings sit outside the transformer blocks; they are never compressed by default.
DEFAULT_MODULES_TO_NOT_CONVERT = (
    "lm_head",
    "pooler",
    "classifier",
    "pre_classifier",
    "score",
    "qa_outputs",
    "embed_out",
    "output_projection",
)
logger = logging.getLogger(__name__)
_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


def matches(name: str, patterns: str | Iterable[str] | None) -> bool:
    """Whether module `name` matches `patterns`: a string is a regex (fullmatch); a list holds exact names, name
    suffixes (``"query"`` matches ``"encoder.layer.0.attention.self.query"``) or regexes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        if any(char in pattern for char in "*+?[]()|\\^$") and re.fullmatch(pattern, name) is not None:
            return True
    return False


def _in_transformer_block(name: str, model: nn.Module) -> bool:
    """A module is inside a transformer block when its path runs through an indexed `nn.ModuleList` entry."""
    parts = name.split(".")
    for depth, part in enumerate(parts[:-1]):
        if part.isdigit():
            parent = model.get_submodule(".".join(parts[:depth])) if depth else model
            if isinstance(parent, nn.ModuleList):
                return True
    return False


def _excluded(name: str, excluded: Iterable[str]) -> bool:
    """A module is excluded when it or any module containing it matches `excluded`."""
    parts = name.split(".")
    return any(matches(".".join(parts[:depth]), excluded) for depth in range(len(parts), 0, -1))


def _output_embedding_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if output is None:
        return set()
    return {name for name, module in model.named_modules() if module is output}


def config_excludes(name: str, config: FWSVDConfig) -> bool:
    """Whether the user's own `modules_to_not_convert` (not the default list) excludes `name`."""
    return config.modules_to_not_convert is not None and _excluded(name, config.modules_to_not_convert)


def _report_skipped(
    skipped: list[str], protected: set[str], targets: dict[str, nn.Module], config: FWSVDConfig
) -> None:
    heads = [name for name in skipped if name in protected]
    if heads:
        text = (
            f"`target_modules={config.target_modules!r}` matches the output embedding {', '.join(heads)}, which "
            "hf_fwsvd never compresses (it maps hidden states to the vocabulary and is usually tied to the input "
            "embedding)"
        )
        if not targets:
            raise ValueError(f"{text}. Target the linear layers of the transformer blocks instead.")
        logger.warning("%s; it stays dense.", text)
    others = [name for name in skipped if name not in protected]
    if others:
        logger.warning(
            "`target_modules=%r` matches %s, excluded by default (task heads and poolers stay dense); it stays dense. "
            "Pass `modules_to_not_convert=[]` to compress it.",
            config.target_modules,
            ", ".join(others[:5]),
        )


def _check_float_weights(targets: dict[str, nn.Module]) -> None:
    for name, module in targets.items():
        weight = getattr(module, "weight", None)
        if torch.is_tensor(weight) and not weight.dtype.is_floating_point:
            raise ValueError(
                f"`{name}` has {str(weight.dtype).removeprefix('torch.')} weights (a quantized layer); FWSVD "
                "factorises floating-point weights. Load the model unquantized (float32, float16 or bfloat16), or "
                "exclude the module with `modules_to_not_convert`."
            )


def find_target_modules(model: nn.Module, config: FWSVDConfig) -> dict[str, nn.Module]:
    """Resolve the dense linear modules `config` compresses in `model`.

    Args:
        model (`nn.Module`): The (dense) model.
        config ([`FWSVDConfig`]): Its `target_modules` and `modules_to_not_convert` decide.

    Returns:
        `dict[str, nn.Module]`: Module name -> dense layer (`nn.Linear` or `Conv1D`), in model order.

    Raises:
        `ValueError`: When an explicit target names a module that is not a linear layer, or nothing matches.
    """
    excluded = (
        DEFAULT_MODULES_TO_NOT_CONVERT if config.modules_to_not_convert is None else config.modules_to_not_convert
    )
    protected = _output_embedding_names(model)
    explicit = config.target_modules not in (None, "all-linear")
    targets: dict[str, nn.Module] = {}
    not_linear: list[str] = []
    skipped: list[str] = []  # explicitly targeted, but an output embedding or excluded by default
    for name, module in model.named_modules():
        if not name or isinstance(module, LowRankLinear):
            continue
        if name in protected or _excluded(name, excluded):
            if (
                explicit
                and matches(name, config.target_modules)
                and (name in protected or not config_excludes(name, config))
            ):
                skipped.append(name)
            continue
        if explicit:
            if not matches(name, config.target_modules):
                continue
            if not is_supported_linear(module):
                not_linear.append(f"{name} ({type(module).__name__})")
                continue
        elif not is_supported_linear(module) or (
            config.target_modules is None and not _in_transformer_block(name, model)
        ):
            continue
        targets[name] = module
    if not_linear:
        raise ValueError(
            f"`target_modules={config.target_modules!r}` matches modules that are not linear layers: "
            f"{', '.join(not_linear[:5])}{' ...' if len(not_linear) > 5 else ''}. Target the Linear/Conv1D leaves, "
            "e.g. ['query', 'key', 'value'] or a regex such as r'.*\\.(query|key|value)'."
        )
    if skipped:
        _report_skipped(skipped, protected, targets, config)
    _check_float_weights(targets)
    if not targets:
        linear = [n for n, m in model.named_modules() if is_supported_linear(m)][:6]
        raise ValueError(
            f"No module of {type(model).__name__} matched `target_modules={config.target_modules!r}` (after "
            f"`modules_to_not_convert`). Linear layers in this model include: {', '.join(linear) or 'none'}."
        )
    return targets
