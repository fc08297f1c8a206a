"""Ctrl-C during training: the first one stops after the current step (which is checkpointed),
a second one stops at once.

Why not let ``KeyboardInterrupt`` fly: it can land in the middle of an optimizer update or a
checkpoint write. Asking the loop to stop keeps the last step whole, so the saved checkpoint
resumes exactly.

When SIGINT is *ignored* as the process starts (``moelab train ... &`` from a script or any
non-interactive shell, ``nohup``-style launchers), it stays ignored: the parent asked that Ctrl-C
pressed for the foreground job not reach this one, and Python itself keeps ``SIG_IGN`` then (no
``KeyboardInterrupt``). A background run is stopped with SIGTERM/SIGKILL and resumed from its
last checkpoint; ``kill -INT`` does nothing to it, as to any program started that way.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopOnCtrlC"]


class StopOnCtrlC:
    """While entered (in the main thread), SIGINT sets :attr:`requested` instead of raising;
    a second SIGINT raises ``KeyboardInterrupt``. The previous handler is restored on exit.
    An ignored SIGINT (``SIG_IGN``) is left ignored (see the module docstring)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopOnCtrlC:
        if threading.current_thread() is not threading.main_thread():  # signals: main only
            return self
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background
            return self
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (again to abort)")
