"""Register FWSVD with transformers, add `fwsvd_config=` to `from_pretrained`, and route saves and pushes of
compressed models through the FWSVD checkpoint writer (weights, config, model card)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from transformers import PreTrainedModel
from transformers.quantizers import auto as quantizers_auto

from .checkpoint_checks import check_local_checkpoint
from .config import FWSVDConfig
from .distributed import is_main_process
from .hub import push_compressed_to_hub
from .model_card import is_fwsvd_card, write_model_card
from .peft_integration import install_peft_support
from .provenance import read_saved_report, refresh_report, sync_ranks, write_report, write_tokenizer
from .quantizer import FWSVDHfQuantizer
from .report import report_from_model
from .serialization import is_fwsvd_model, save_atomically

__all__ = ["install"]

logger = logging.getLogger(__name__)

_WRAPPED_FLAG = "__hf_fwsvd_wrapped__"


def _register() -> None:
    # Set the mappings directly rather than through `register_quantizer`, which raises on a second registration
    # (re-import, importlib.reload) instead of being idempotent.
    quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["fwsvd"] = FWSVDConfig
    quantizers_auto.AUTO_QUANTIZER_MAPPING["fwsvd"] = FWSVDHfQuantizer


def _wrap_from_pretrained() -> None:
    original = PreTrainedModel.from_pretrained
    if getattr(original, _WRAPPED_FLAG, False):
        return
    original_function = original.__func__

    @functools.wraps(original_function)
    def from_pretrained(cls: type, *args: Any, fwsvd_config: FWSVDConfig | None = None, **kwargs: Any) -> Any:
        if fwsvd_config is not None:
            if kwargs.get("quantization_config") is not None:
                raise ValueError("Pass either `fwsvd_config=` or `quantization_config=`, not both.")
            if not isinstance(fwsvd_config, FWSVDConfig):
                raise TypeError(f"`fwsvd_config` must be an FWSVDConfig, got {type(fwsvd_config).__name__}.")
            kwargs["quantization_config"] = fwsvd_config
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            check_local_checkpoint(source, kwargs.get("subfolder") or "")
        result = original_function(cls, *args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        if fwsvd_config is None and is_fwsvd_model(model) and not hasattr(model, "fwsvd_report"):
            _attach_saved_report(model, source, kwargs)
        return result

    setattr(from_pretrained, _WRAPPED_FLAG, True)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _attach_saved_report(model: PreTrainedModel, source: Any, kwargs: dict[str, Any]) -> None:
    """Give a reloaded checkpoint its saved `fwsvd_report` (or one rebuilt from its modules for older checkpoints)."""
    report = read_saved_report(source, **kwargs) if isinstance(source, (str, os.PathLike)) else None
    model.fwsvd_report = report if report is not None else report_from_model(model)
    model.fwsvd_report.fingerprint = None  # the loaded weights are the reference (dtype casts change the bytes)
    refresh_report(model)


def _wrap_save_pretrained() -> None:
    original = PreTrainedModel.save_pretrained
    if getattr(original, _WRAPPED_FLAG, False):
        return

    @functools.wraps(original)
    def save_pretrained(self: PreTrainedModel, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        if not is_fwsvd_model(self):
            kwargs.pop("model_card", None)
            return original(self, save_directory, *args, **kwargs)
        if args:
            raise TypeError("Pass save_pretrained options of a compressed model as keywords.")
        if not (kwargs.get("is_main_process", True) and is_main_process()):
            # Under accelerate/torchrun only the main process writes; concurrent atomic saves would race.
            logger.info("Not the main process: skipping save_pretrained of the FWSVD checkpoint to %s", save_directory)
            return None
        push_to_hub = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None)
        write_card = kwargs.pop("model_card", True)
        hub_kwargs = {key: kwargs.pop(key) for key in ("token", "commit_message", "private") if key in kwargs}
        api = None
        load_path = os.fspath(save_directory)
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=hub_kwargs.get("token"))
            repo_id = repo_id or os.path.basename(os.path.abspath(save_directory))
            repo_id = load_path = api.create_repo(repo_id, exist_ok=True, private=hub_kwargs.get("private")).repo_id
        readme = os.path.join(os.fspath(save_directory), "README.md")
        if write_card and os.path.isfile(readme) and not is_fwsvd_card(readme):
            logger.warning("Keeping your %s: the FWSVD model card is not written over it.", readme)
            write_card = False
        sync_ranks(self)  # before config.json is written: a merged LoRA adapter grows ranks
        writers = [write_tokenizer, write_report]
        if write_card:
            writers.append(functools.partial(write_model_card, load_path=load_path))
        save_atomically(self, save_directory, original, extra_writers=writers, **kwargs)
        if push_to_hub:
            api.upload_folder(
                repo_id=repo_id, folder_path=save_directory, commit_message=hub_kwargs.get("commit_message")
            )
        return None

    setattr(save_pretrained, _WRAPPED_FLAG, True)
    PreTrainedModel.save_pretrained = save_pretrained


def _wrap_push_to_hub() -> None:
    original = PreTrainedModel.push_to_hub
    if getattr(original, _WRAPPED_FLAG, False):
        return

    @functools.wraps(original)
    def push_to_hub(self: PreTrainedModel, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if not is_fwsvd_model(self):
            return original(self, repo_id, *args, **kwargs)
        if args:
            raise TypeError("Pass push_to_hub options of a compressed model as keywords.")
        return push_compressed_to_hub(self, repo_id, **kwargs)

    setattr(push_to_hub, _WRAPPED_FLAG, True)
    PreTrainedModel.push_to_hub = push_to_hub


def install() -> None:
    """Register the `fwsvd` method, the `fwsvd_config=` keyword, the save/push wrappers and the peft LoRA layer for
    `LowRankLinear` (idempotent)."""
    _register()
    _wrap_from_pretrained()
    _wrap_save_pretrained()
    _wrap_push_to_hub()
    install_peft_support()
