"""Pytest fixture that points `huggingface_hub` and `transformers` at a local `HubStub`.

`huggingface_hub` reads its environment once, at import time, into `huggingface_hub.constants` (`ENDPOINT`,
`HUGGINGFACE_CO_URL_TEMPLATE`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_HUB_DISABLE_XET`, ...), and already-built
`HfApi` objects keep the endpoint they were created with. Setting `HF_ENDPOINT` inside a test is therefore not
enough once the libraries are imported. The fixture instead patches, with `monkeypatch` (undone after the test):

- the environment (`HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_XET_CACHE`, `HF_TOKEN`, `HF_HUB_DISABLE_XET`; the
  `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` variables removed), for subprocesses started by the test;
- the matching attributes of `huggingface_hub.constants`, which every download and upload function reads at call
  time (`hf_hub_url` builds URLs from `HUGGINGFACE_CO_URL_TEMPLATE`, not from `ENDPOINT`, so both are patched);
- `huggingface_hub.hf_api.api.endpoint`: the module-level `HfApi` behind `huggingface_hub.create_repo`,
  `upload_file`, `ModelCard.push_to_hub`, ...;
- `transformers.utils.hub._hf_api`, the `HfApi` that transformers caches for the process (reset to `None`, so the
  next `push_to_hub` builds a fresh one with the stub endpoint).

Uploads are forced onto the legacy LFS path: with `hf_xet` installed, huggingface_hub 2.x picks Xet on the client
side alone (`utils._runtime.is_xet_available()`, no server negotiation) for both `create_commit` and
`upload_folder`; the only switch is `constants.HF_HUB_DISABLE_XET`, which the fixture sets. Downloads use plain HTTP
because the stub never sends the `X-Xet-Hash` header.
"""

import pytest

from .server import HubStub

__all__ = ["hub_endpoint"]


@pytest.fixture
def hub_endpoint(tmp_path, monkeypatch):
    """Start a `HubStub` under `tmp_path / "hub"` and point the Hub clients at it; yields the running stub.

    The Hugging Face cache lives in `tmp_path / "hf_home"` (`stub_cache = huggingface_hub.constants.HF_HUB_CACHE`
    during the test), the token is a dummy, and everything is restored when the test ends.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module

    hf_home = tmp_path / "hf_home"
    with HubStub(tmp_path / "hub") as stub:
        env = {
            "HF_ENDPOINT": stub.endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_XET_CACHE": str(hf_home / "xet"),
            "HF_TOKEN": "hf_hubstub_dummy_token",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH", "HUGGINGFACE_CO_STAGING"):
            monkeypatch.delenv(key, raising=False)

        patched_constants = {
            "ENDPOINT": stub.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": stub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_ASSETS_CACHE": str(hf_home / "assets"),
            "HF_XET_CACHE": str(hf_home / "xet"),
            "HF_TOKEN_PATH": str(hf_home / "token"),
            "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
        }
        for name, value in patched_constants.items():
            monkeypatch.setattr(constants, name, value)  # raises if hf_hub renamed one
        monkeypatch.setattr(hf_api_module.api, "endpoint", stub.endpoint)
        try:
            import transformers.utils.hub as transformers_hub
        except ImportError:
            pass
        else:
            monkeypatch.setattr(transformers_hub, "_hf_api", None)

        yield stub
        monkeypatch.undo()  # restore before the server stops, so no client is left pointing at a dead port
