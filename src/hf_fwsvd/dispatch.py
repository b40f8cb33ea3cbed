"""An empty compressed model for `accelerate.load_checkpoint_and_dispatch`.

accelerate's recipe builds the dense architecture with `init_empty_weights` and then loads a checkpoint into it.
For an FWSVD checkpoint that skeleton is wrong (dense `Linear`s where the checkpoint has `down`/`up` factors) and
the weights are named `model.fwsvd.safetensors`, so the recipe fails. [`init_empty_compressed`] builds the right
skeleton (the `LowRankLinear` modules of the saved rank map, on the meta device, marked as an FWSVD model) and
returns the weights file to pass to `load_checkpoint_and_dispatch`.

The simpler supported route does the same in one call: ``AutoModelFor...from_pretrained(path, device_map="auto")``
(with `max_memory`, `offload_folder`, ... as usual).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["init_empty_compressed"]


def init_empty_compressed(path: str | os.PathLike, model_class: Any = None) -> tuple[Any, str]:
    """An empty (meta-device) compressed model for a local FWSVD checkpoint, and the weights file to load into it.

    Args:
        path (`str` or `os.PathLike`): A local FWSVD checkpoint folder.
        model_class (*optional*): The transformers class to build (default: the first of `config.architectures`).

    Returns:
        `tuple`: ``(model, weights_file)`` for ``accelerate.load_checkpoint_and_dispatch(model, weights_file, ...)``.

    Raises:
        `ValueError`: When `path` is not an FWSVD checkpoint folder.
    """
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .config import FWSVDConfig
    from .quantizer import mark_compressed
    from .replace import build_low_rank_skeleton
    from .serialization import WEIGHTS_NAME

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is not a checkpoint folder (no config.json).")
    config = AutoConfig.from_pretrained(path)
    quantization = getattr(config, "quantization_config", None)
    if not isinstance(quantization, FWSVDConfig):
        quantization = FWSVDConfig.from_dict(dict(quantization)) if isinstance(quantization, dict) else None
    if quantization is None or quantization.quant_method != "fwsvd" or not quantization.is_compressed:
        raise ValueError(
            f"{path!r} is not an FWSVD checkpoint (no fwsvd quantization_config with a rank map); load it with "
            "accelerate's usual recipe."
        )
    if model_class is None:
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, architecture or "", None)
        if model_class is None:
            raise ValueError(f"{path!r} names architecture {architecture!r}; pass `model_class=`.")
    del config.quantization_config
    with init_empty_weights():
        model = model_class._from_config(config)
        found = build_low_rank_skeleton(model, quantization.ranks)
    quantization.source_classes = {**found, **quantization.source_classes}
    mark_compressed(model, quantization)
    return model, os.path.join(path, quantization.weights_file or WEIGHTS_NAME)
