"""Signals. In `fit`, preemption: SIGTERM/SIGINT set a flag that the ranks agree on at the next sync point.

A second Ctrl-C aborts at once. The flag travels in the loss all-reduce, so a signal that reached one rank
stops every rank at the same step.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """The handlers from before install(); but once a SIGTERM has asked the job to stop, later SIGTERMs are
        ignored while it checkpoints and says so: they carry no news, and a worker whose launcher died gets one
        for each of the launcher's threads as they end (PR_SET_PDEATHSIG), some after training has stopped."""
        for sig, handler in self._previous.items():
            stopping = sig == signal.SIGTERM and self.signal_name == "SIGTERM"
            signal.signal(sig, signal.SIG_IGN if stopping else handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM (a scheduler's or `kill`'s) raises KeyboardInterrupt like Ctrl-C, so a command that writes a
    file cleans up its temporary file and says so instead of dying mid-write."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
