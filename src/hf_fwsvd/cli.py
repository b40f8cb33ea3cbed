"""The `hf-fwsvd` command line: compress, evaluate, inspect, export-dense, export-onnx and sweep.

Exit codes: 0 success; 1 the command ran and failed (bad data, a model that cannot be compressed, ...); 2 the
command line is wrong (unknown option, contradictory or out-of-range values, missing input path, output folder in
the way); nothing was run. 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .commands import COMMANDS
from .commands.common import EXIT_FAILURE, EXIT_USAGE, CommandError
from .version import __version__

__all__ = ["build_parser", "main"]

DESCRIPTION = """Fisher-Weighted SVD compression for Hugging Face Transformers models.

Compress a model on task data, evaluate it, inspect or export the checkpoint, or sweep ratios and plot them.
Run `hf-fwsvd COMMAND --help` for the options of a command."""

EPILOG = """exit codes:
  0  success
  1  the command ran and failed (bad data, a model that cannot be compressed, ...)
  2  the command line is wrong (bad option or value, missing input, output in the way); nothing was run"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hf-fwsvd` with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="hf-fwsvd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-fwsvd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="Hide compression progress bars and info messages.")
    common.add_argument("-v", "--verbose", action="store_true", help="Log what hf_fwsvd does (INFO level).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    original_add = subparsers.add_parser

    def add_parser(name: str, **kwargs):  # every command gets -q / -v
        return original_add(name, parents=[common], **kwargs)

    subparsers.add_parser = add_parser
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    import datasets
    from transformers.utils import logging as transformers_logging

    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hf_fwsvd").setLevel(level)
    datasets.disable_progress_bars()  # reading a data file is instant; its bars are noise
    if args.quiet:
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-fwsvd` with `argv` (default: `sys.argv[1:]`) and return the exit code.

    As a console script the return value becomes the process exit status; tests call it in-process.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits with 2 on bad usage and 0 after --help / --version
        return int(exit_.code or 0)
    _configure_logging(args)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"hf-fwsvd {args.command}: error: {error}", file=sys.stderr)
        if error.exit_code == EXIT_USAGE:
            print(f"Run `hf-fwsvd {args.command} --help` for the options.", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"hf-fwsvd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # any other failure: still one line (the traceback with --verbose)
        if args.verbose:
            logging.getLogger("hf_fwsvd").exception("hf-fwsvd %s failed", args.command)
        message = " ".join(str(error).split()) or "(no message)"
        print(f"hf-fwsvd {args.command}: error: {type(error).__name__}: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
