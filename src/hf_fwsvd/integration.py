"""Register FWSVD with transformers, add `fwsvd_config=` to `from_pretrained`, and route saves and pushes of
compressed models through the FWSVD checkpoint writer (weights, config, model card)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedModel
from transformers.quantizers import auto as quantizers_auto

from .atomic_dir import pinned_directory, recover
from .checkpoint_checks import check_loading_info, check_local_checkpoint
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


_SHOWN: dict[str, str] = {}  # pinned path (``/proc/self/fd/N``) -> the path the user gave, while a load runs


@contextlib.contextmanager
def _pinned(source: str, kwargs: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(pinned path, path to show in messages)``; a path an outer call already pinned is used as it is. Loads with
    a `device_map` or `offload_folder` are not pinned: offloaded weights are read from the checkpoint files after
    `from_pretrained` returns, when the pinned handle is closed."""
    if source in _SHOWN:
        yield source, _SHOWN[source]
        return
    if kwargs.get("device_map") is not None or kwargs.get("offload_folder") is not None:
        yield source, source
        return
    with pinned_directory(source) as pinned:
        if pinned == source:
            yield source, source
            return
        _SHOWN[pinned] = source
        try:
            yield pinned, source
        finally:
            del _SHOWN[pinned]


def _with_path(error: Exception, pinned: str, source: str) -> Exception:
    """`error` with the pinned ``/proc/self/fd/N`` path shown as the path the user gave."""
    try:
        return type(error)(str(error).replace(pinned, source))
    except Exception:  # an exception type that takes other arguments: keep it as it is
        return error


def _load_checked(
    original_function: Any, cls: type, args: tuple, kwargs: dict, shown: Any = None, pinned: str | None = None
) -> Any:
    """Load with transformers, then refuse an FWSVD checkpoint whose weights lack tensors the model needs. `pinned`
    is the path actually loaded when it differs from the one the user gave (`shown`)."""
    wants_info = kwargs.pop("output_loading_info", False)
    loaded = original_function(cls, *args, output_loading_info=True, **kwargs)
    model, info = loaded if isinstance(loaded, tuple) else (loaded, None)
    if pinned is not None and hasattr(model, "config"):
        model.config._name_or_path = shown
    quantizer = getattr(model, "hf_quantizer", None)
    if info is not None and getattr(quantizer, "loaded_from_checkpoint", False):
        check_loading_info(model, info, str(shown), pinned, kwargs.get("subfolder") or "")
    return (model, info) if wants_info else model


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
        result = _load_with_checks(original_function, cls, args, kwargs, source)
        model = result[0] if isinstance(result, tuple) else result
        if fwsvd_config is None and is_fwsvd_model(model) and not hasattr(model, "fwsvd_report"):
            _attach_saved_report(model, source, kwargs)
        return result

    setattr(from_pretrained, _WRAPPED_FLAG, True)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _load_with_checks(original_function: Any, cls: type, args: tuple, kwargs: dict, source: Any) -> Any:
    """Load through transformers with hf_fwsvd's checks, the folder pinned against a concurrent save."""
    if isinstance(source, (str, os.PathLike)):
        recover(source)  # a save killed between its renames left the folder missing: put it back first
    if not (isinstance(source, (str, os.PathLike)) and os.path.isdir(source)):
        return _load_checked(original_function, cls, args, kwargs, shown=source)
    source = os.fspath(source)
    with _pinned(source, kwargs) as (pinned, source):  # a concurrent save cannot swap files under this load
        check_local_checkpoint(pinned, kwargs.get("subfolder") or "", shown_as=source)
        if args:
            args = (pinned, *args[1:])
        else:
            kwargs["pretrained_model_name_or_path"] = pinned
        try:
            return _load_checked(original_function, cls, args, kwargs, shown=source, pinned=pinned)
        except Exception as error:
            if pinned != source and pinned in str(error):
                raise _with_path(error, pinned, source) from error
            raise


def _pinning(original_function: Any) -> Any:
    """Wrap an Auto class's `from_pretrained`: Auto classes read `config.json` before the model class loads the
    weights, so pin the folder for both; a concurrent save cannot give this load the config of one checkpoint and
    the weights of another."""

    @functools.wraps(original_function)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, os.PathLike)):
            recover(source)  # a save killed between its renames left the folder missing: put it back first
        if not (isinstance(source, (str, os.PathLike)) and os.path.isdir(source)):
            return original_function(cls, *args, **kwargs)
        source = os.fspath(source)
        with _pinned(source, kwargs) as (pinned, source):
            if pinned == source:
                return original_function(cls, *args, **kwargs)
            if args:
                args = (pinned, *args[1:])
            else:
                kwargs["pretrained_model_name_or_path"] = pinned
            try:
                loaded = original_function(cls, *args, **kwargs)
            except Exception as error:
                if pinned in str(error):
                    raise _with_path(error, pinned, source) from error
                raise
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if hasattr(model, "config"):
            model.config._name_or_path = source
        return loaded

    setattr(from_pretrained, _WRAPPED_FLAG, True)
    return from_pretrained


def _wrap_auto_from_pretrained() -> None:
    import transformers.models.auto.modeling_auto  # noqa: F401  (defines every Auto model class)
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    pending, seen = [_BaseAutoModelClass], set()
    while pending:
        auto_class = pending.pop()
        if auto_class in seen:
            continue
        seen.add(auto_class)
        pending.extend(auto_class.__subclasses__())
        method = auto_class.__dict__.get("from_pretrained")
        if isinstance(method, classmethod) and not getattr(method.__func__, _WRAPPED_FLAG, False):
            auto_class.from_pretrained = classmethod(_pinning(method.__func__))


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
    _wrap_auto_from_pretrained()
    _wrap_save_pretrained()
    _wrap_push_to_hub()
    install_peft_support()
