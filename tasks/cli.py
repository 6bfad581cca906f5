"""What every command-line tool shares: logging set up once per process, and one place where user
errors become one line.

A tool's ``main(argv) -> int`` is wrapped by ``@tool``: a ``UserError`` (a config key, a missing file, a
bad image, a checkpoint that does not fit, ...) is printed as ``error: <message>`` on stderr with exit
code 2 and no traceback; ``--debug`` on the command line (or ``RESDET_DEBUG=1``) lets it raise with its
traceback. Anything else is a bug and keeps its traceback. Training stopped by SIGTERM/SIGINT prints where
it stopped and exits with ``128 + signal``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

from backbones.errors import TrainingInterrupted, UserError

DEBUG_HELP = "show the traceback of errors in the input (also RESDET_DEBUG=1)"


def process_rank() -> int:
    """This process's rank under ``accelerate launch`` / torchrun (0 when launched alone)."""
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def setup_logging() -> None:
    """INFO on the main process; warnings and errors only on the others, so a multi-process run prints
    each line once."""
    level = logging.INFO if process_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def user_message(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker arrives wrapped with the
    worker's traceback; only the original message is kept."""
    message = str(error)
    cls = type(error)
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    if "Original Traceback" in message and marker in message:
        message = message[message.rindex(marker) + len(marker):]
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("RESDET_DEBUG", "") not in ("", "0")


def tool(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Wrap a tool's ``main(argv)``: see the module docstring. Its parser should accept ``--debug``."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        setup_logging()
        try:
            return main(argv)
        except TrainingInterrupted as stopped:
            print(str(stopped), file=sys.stderr)
            return 128 + stopped.signum
        except UserError as error:
            if debug_requested(argv):
                raise
            print(f"error: {user_message(error)}", file=sys.stderr)
            return 2

    return run
