"""Fault injection for the project's own tests: one rank fails, hangs or stops at a chosen step.

DDPTRAIN_FAIL_AT_STEP=RANK:STEP[:MODE], read once with the launcher's variables (launchenv.py). STEP 0 is the start of `fit` (before the data is
read); STEP n >= 1 is right after optimizer step n. MODE: `raise` (a RuntimeError, the default), `hang` (stops
answering, as a stuck process does) or `stop` (a real SIGSTOP to itself, as `kill -STOP` or a frozen node does).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

MODES = ("raise", "hang", "stop")


@dataclass(frozen=True)
class InjectedFault:
    step: int
    mode: str

    def maybe_fire(self, step: int) -> None:
        if step != self.step:
            return
        if self.mode == "hang":
            while True:
                time.sleep(1)
        if self.mode == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        raise RuntimeError(f"injected failure at step {step} (DDPTRAIN_FAIL_AT_STEP)")


def parse_fault(text: str, rank: int) -> InjectedFault | None:
    """DDPTRAIN_FAIL_AT_STEP's value, for `rank` (None: no fault here)."""
    parts = text.split(":")
    if len(parts) < 2 or int(parts[0]) != rank:
        return None
    mode = parts[2] if len(parts) > 2 else "raise"
    if mode not in MODES:
        raise ValueError(f"DDPTRAIN_FAIL_AT_STEP mode {mode!r} is not one of {MODES}")
    return InjectedFault(int(parts[1]), mode)
