"""What every zonegate program's ``main`` shares: ``--config``/``--log-level`` and clean exits.

``python -m exchange``, ``python -m sidecar`` and the ``zonegate`` command all end here, so a
config error, a taken port or Ctrl-C reads the same whichever way a program was started.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from runtime.configload import ConfigError

EXIT_CONFIG = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ProgramMain = Callable[..., int]


def add_program_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every server program takes."""
    parser.add_argument("--config", required=True, type=Path, help="YAML config file")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)


def guarded(call: Callable[[], int]) -> int:
    """Run ``call``; a config error, an OS error or Ctrl-C becomes a message and an exit code."""
    try:
        return int(call())
    except ConfigError as e:
        print(f"zonegate: invalid configuration ({len(e.errors)} problem(s)):", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # e.g. the listen address is taken
        print(f"zonegate: {e.strerror or e}", file=sys.stderr)
        return 1


def run_program(prog: str, description: str, main: ProgramMain, argv: Sequence[str]) -> int:
    """``python -m <package> --config F``: parse the arguments and run ``main`` guarded."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_program_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: main(args.config, log_level=args.log_level))
