"""Preemption signals: the handler only records that one arrived; the manager acts at a step boundary.

A signal may land anywhere (inside a collective, inside a write), so the handler does no I/O and no
communication. The ranks agree with one all-reduce(MAX) at the next step boundary, save together and
exit with EXIT_PREEMPTED (caduceus_dist.errors), which launchers read as "requeue me" (docs/resume.md §4).
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Installs handlers for `signal_names`; `received` is the first signal number caught (or None)."""

    def __init__(self, signal_names: list[str]):
        self.received: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals not installed: CheckpointManager was built outside the main thread")
            return
        for name in signal_names:
            signum = signal.Signals[name]
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        """Give the signals back to whoever had them (tests and notebooks build several managers)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
