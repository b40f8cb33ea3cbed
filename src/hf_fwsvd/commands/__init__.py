"""The `hf-fwsvd` subcommands, one module each; `hf_fwsvd.cli` builds the parser from them."""

from . import compress, evaluate, export_dense, inspect, sweep

COMMANDS = (compress, evaluate, inspect, export_dense, sweep)

__all__ = ["COMMANDS"]
