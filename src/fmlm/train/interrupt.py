"""Ctrl-C during training: finish the step, save, return (a second Ctrl-C stops at once)."""

from __future__ import annotations

import signal
import threading


class _GracefulInterrupt:
    """While training, the first SIGINT only sets ``requested`` (the loop stops at the next step
    boundary and saves); a second one raises KeyboardInterrupt at once. Outside the main thread
    (where Python cannot install signal handlers) Ctrl-C keeps its default behaviour."""

    def __init__(self, trainer):  # a Trainer: its log() announces the stop
        self.trainer = trainer
        self.requested = False
        self._installed = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.trainer.log("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)")

    def __enter__(self) -> "_GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
