"""The `hf-fwsvd` subcommands, one module each; `hf_fwsvd.cli` builds the parser from them."""

from . import compress, evaluate, export_dense, export_onnx, inspect, sweep

COMMANDS = (compress, evaluate, inspect, export_dense, export_onnx, sweep)

__all__ = ["COMMANDS"]
