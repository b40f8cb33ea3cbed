# `tests/` has no __init__.py, so pytest puts it on sys.path and `hub_stub` imports as a top-level package.
from hub_stub.fixtures import hub_endpoint  # noqa: F401
