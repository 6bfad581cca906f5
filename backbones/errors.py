"""The exceptions every tool handles, shared by every package of the project: user errors and a stopped run.

A ``UserError`` is a fault in what the user gave (a config key or value, a file, an image, an annotation,
a checkpoint that does not fit): its message says what, where and what to do, in one line. The tools
print it as ``error: <message>`` and exit with code 2, without a traceback (``--debug`` shows one).
Anything else that escapes is a bug and keeps its traceback. It lives in ``backbones`` because that is the
package every other one builds on.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, config or files; the message is meant to be read by the user.

    A ``ValueError``, so code that validated arguments with ``ValueError`` before keeps working."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (in a config, on the command line) does not exist."""


class TrainingInterrupted(Exception):
    """Training stopped by SIGTERM or SIGINT after a checkpoint was written at ``iteration`` on every
    process. Not a fault: the tools print the message and exit with ``128 + signum`` (143 for SIGTERM, 130
    for SIGINT); the same command with ``resume=auto`` continues."""

    def __init__(self, message: str, iteration: int, signum: int):
        super().__init__(message)
        self.iteration, self.signum = iteration, signum
