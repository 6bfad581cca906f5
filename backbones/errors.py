"""The one exception type for user errors, shared by every package of the project.

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
