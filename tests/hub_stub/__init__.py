"""Local stand-in for the Hugging Face Hub used by the tests; see `server.py` and `fixtures.py`."""

from .server import HubStub

__all__ = ["HubStub"]
