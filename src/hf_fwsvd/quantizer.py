"""`FWSVDHfQuantizer`: the transformers `from_pretrained` lifecycle hooks, and nothing else."""

from __future__ import annotations

import logging
from typing import Any

from transformers.quantizers.base import HfQuantizer

from .checkpoint_checks import check_factors_finite, check_weights_match_ranks
from .config import FWSVDConfig

__all__ = ["FWSVDHfQuantizer", "mark_compressed"]

logger = logging.getLogger(__name__)


class FWSVDHfQuantizer(HfQuantizer):
    """Compress on load (a dense checkpoint plus an [`FWSVDConfig`] with calibration data), or rebuild the low-rank
    modules of an FWSVD checkpoint before its weights are read (so dense weights are never materialised).

    Args:
        quantization_config ([`FWSVDConfig`]): The config; copied, so the caller's object is never modified.
        copy_config (`bool`, *optional*, defaults to `True`): Copy the config (internal use passes `False`).
    """

    requires_calibration = False

    def __init__(self, quantization_config: FWSVDConfig, copy_config: bool = True, **kwargs: Any) -> None:
        if not isinstance(quantization_config, FWSVDConfig):
            quantization_config = FWSVDConfig.from_dict(dict(quantization_config))
        if copy_config:
            quantization_config = quantization_config.copy_for_run()
        super().__init__(quantization_config, **kwargs)
        self.loaded_from_checkpoint = self.pre_quantized  # compress-on-load sets `pre_quantized` later
        if self.pre_quantized and not quantization_config.is_compressed:
            raise ValueError(
                "This checkpoint's quantization_config has quant_method 'fwsvd' but no rank map (`ranks`): it was "
                "not written by hf_fwsvd's save_pretrained, or it was edited. Re-export it from the compressed model."
            )

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if self.pre_quantized or not isinstance(device_map, dict):
            return
        offloaded = sorted({str(v) for v in device_map.values()} & {"disk", "meta"})
        if offloaded:
            raise ValueError(
                f"Compress-on-load cannot run with `device_map` offloading to {', '.join(offloaded)}: FWSVD must read "
                "every dense weight. Load without offloading to compress, then reload the compressed checkpoint with "
                "any device_map."
            )

    def update_attn_implementation(self, config: Any) -> Any:
        # The only hook that sees the model config before transformers resolves the weight files: point it at the
        # FWSVD weights (see `serialization`). The attribute is removed again once loading is done.
        if self.pre_quantized:
            # Without a recorded file name, still force a safetensors file: never fall back to a pickle.
            config.transformers_weights = self.quantization_config.weights_file or "model.safetensors"
        return config

    def update_parallel_plan(self, model: Any, plan: dict[str, str]) -> None:
        # The base hook adds plan entries for a quantizer's extra serialised tensors (scales, ...). FWSVD has none
        # (`serialized_names` is empty), so its walk over every parameter name, twice per load, would change nothing.
        if self.serialized_names:
            super().update_parallel_plan(model, plan)

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self.pre_quantized:
            from .ranks import match_model_prefix
            from .replace import build_low_rank_skeleton

            config = self.quantization_config  # `AutoModel` on a `*For<Task>` checkpoint (and the reverse)
            config.ranks = match_model_prefix(config.ranks, model)
            config.source_classes = match_model_prefix(config.source_classes, model) if config.source_classes else {}
            found = build_low_rank_skeleton(model, self.quantization_config.ranks)
            self.quantization_config.source_classes = {**found, **self.quantization_config.source_classes}
            if config.factor_dtype is not None:
                from .factor_storage import build_int8_slots

                build_int8_slots(model, list(config.ranks))
            checkpoint_files = kwargs.get("checkpoint_files")
            if checkpoint_files:
                check_weights_match_ranks(
                    model, self.quantization_config.ranks, checkpoint_files, factor_dtype=config.factor_dtype
                )
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self.pre_quantized:
            if self.quantization_config.factor_dtype is not None:
                from .factor_storage import finish_int8_factors

                finish_int8_factors(model)
            check_factors_finite(model)
            if hasattr(model.config, "transformers_weights"):
                del model.config.transformers_weights
        else:
            from .pipeline import compress_model

            # The pipeline works on its own copy; adopt the filled-in copy as this quantizer's config.
            self.quantization_config, model.fwsvd_report = compress_model(model, self.quantization_config)
            self.pre_quantized = True
            mark_compressed(model, self.quantization_config, self)
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, Any] | None, dict[str, str]]:
        # int8 factors are torchao tensors: safetensors stores their plain int8 data, scales and zero points.
        if self.quantization_config.factor_dtype is None:
            return None, {}
        from .factor_storage import flatten_int8_state_dict

        return flatten_int8_state_dict(model), {}

    def _dequantize(self, model: Any, dtype: Any = None) -> Any:
        from .replace import replace_with_dense

        replace_with_dense(model, self.quantization_config.source_classes, dtype)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def mark_compressed(model: Any, config: FWSVDConfig, quantizer: FWSVDHfQuantizer | None = None) -> None:
    """Make a model compressed outside `from_pretrained` look like one loaded through the quantizer."""
    if not hasattr(model, "config"):
        return
    model.config.quantization_config = config
    model.hf_quantizer = quantizer or FWSVDHfQuantizer(config, pre_quantized=True, copy_config=False)
    model.is_quantized = True
    model.quantization_method = "fwsvd"
    model.config._is_quantized = True
