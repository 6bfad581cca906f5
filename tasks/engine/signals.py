"""SIGTERM and SIGINT turned into a request the training loop honours at the next iteration boundary."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)


class StopSignals:
    """While active, SIGTERM and SIGINT only set ``requested`` (the signal number): the training loop
    finishes its iteration (with ``train.check_period`` N > 1: the iteration of its next check, within N),
    checkpoints and stops. A second SIGINT (Ctrl-C twice) stops at once. Outside the main thread (where
    Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        logger.warning("%s received: stopping after this iteration (train.check_period N > 1: within N), with a "
                       "checkpoint", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
