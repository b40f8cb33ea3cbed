"""The transformers versions hf_fwsvd supports, checked once on `import hf_fwsvd`.

hf_fwsvd plugs into transformers 5's quantizer lifecycle (`HfQuantizer.is_serializable()` without arguments, the
`update_attn_implementation` hook that points the loader at `model.fwsvd.safetensors`, `transformers_weights` in the
config). transformers 4.x has other signatures there, so an old version would import fine and then fail deep inside
`save_pretrained` or `from_pretrained`; this check makes that one clear error at import time instead.
"""

from __future__ import annotations

from packaging.version import Version

__all__ = ["MIN_TRANSFORMERS", "TESTED_TRANSFORMERS", "check_transformers_version"]

MIN_TRANSFORMERS = "5.20"  # keep equal to the floor in pyproject.toml (a test checks it)
TESTED_TRANSFORMERS = "5.24"


def check_transformers_version(installed: str | None = None) -> None:
    """Raise `ImportError` when the installed transformers is older than [`MIN_TRANSFORMERS`].

    Args:
        installed (`str`, *optional*): The version to check (default: `transformers.__version__`).
    """
    if installed is None:
        import transformers

        installed = transformers.__version__
    if Version(installed).release < Version(MIN_TRANSFORMERS).release:
        raise ImportError(
            f"hf_fwsvd needs transformers>={MIN_TRANSFORMERS} (tested with {TESTED_TRANSFORMERS}), but transformers "
            f"{installed} is installed: its quantizer hooks differ and compressed checkpoints would fail to save or "
            f'load. Upgrade it with `pip install "transformers>={MIN_TRANSFORMERS}"`.'
        )
