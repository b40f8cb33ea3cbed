"""Single source of the package version (read by pyproject.toml and written into saved configs)."""

__version__ = "0.1.0"
