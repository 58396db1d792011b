"""Preemption signals: the handler only records that one arrived; the manager acts at a step boundary.

A signal may land anywhere (inside a collective, inside a write), so the handler does no buffered I/O
and no communication. The ranks agree with one all-reduce(MAX) at the next step boundary, save together and
exit with EXIT_PREEMPTED (caduceus_dist.errors), which launchers read as "requeue me" (docs/resume.md §4).

Ctrl-C (SIGINT) takes the same path, so an interactive run keeps its progress: the first press saves at
the next step boundary and exits EXIT_INTERRUPTED; a second press raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

READY_FILE_ENV = "CADUCEUS_READY_FILE"  # set by slurm/pretrain.sh
NONE, PREEMPT, INTERRUPT = 0, 1, 2  # what a rank received; the ranks agree on the largest (all-reduce MAX)


class PreemptionFlag:
    """Installs handlers for `signal_names` and SIGINT; `received` is the first signal number caught (or None)."""

    def __init__(self, signal_names: list[str]):
        self.received: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals not installed: CheckpointManager was built outside the main thread")
            return
        for name in dict.fromkeys([*signal_names, "SIGINT"]):
            signum = signal.Signals[name]
            self._previous[signum] = signal.signal(signum, self._handle)
        _announce_listening()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":  # a raw write is safe in a handler
            os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again stops at once)\n")
        if self.received is None or signum == signal.SIGINT:
            self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def code(self) -> int:
        """NONE, PREEMPT or INTERRUPT (Ctrl-C), the value this rank contributes to the agreement."""
        if self.received is None:
            return NONE
        return INTERRUPT if self.received == signal.SIGINT else PREEMPT

    def close(self) -> None:
        """Give the signals back to whoever had them (tests and notebooks build several managers)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def _announce_listening() -> None:
    """Rank 0 creates $CADUCEUS_READY_FILE once its handlers are in: slurm/pretrain.sh forwards signals only
    after that, when every node's launcher is past the start-up moment in which a signal still kills it."""
    path = os.environ.get(READY_FILE_ENV)
    if not path or os.environ.get("RANK", "0") != "0":
        return
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        log.warning("cannot create %s (%s): the batch script will not forward preemption signals", path, err)
