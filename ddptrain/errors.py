"""The exceptions ddptrain raises and the exit codes they stand for. A leaf: it imports nothing of ddptrain, so
every module may raise these (`report.py` turns them into the job's one error line)."""

from __future__ import annotations

EXIT_RUNTIME = 1
EXIT_USAGE = 2
# EX_TEMPFAIL from sysexits.h: "try again later", which is what a preempted run should do (--resume auto).
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class DDPTrainError(Exception):
    """A problem with the user's data, files or environment (exit 1).

    Most errors are the same on every rank (same flags, same data), so rank 0 alone reports them; `local`
    marks one that may strike a single rank (its device, its disk), which that rank reports itself.
    """

    exit_code = EXIT_RUNTIME
    names_rank: bool | None = None  # whether the line names the rank: None, when it is `local` to this rank

    def __init__(self, message: str, local: bool = False) -> None:
        super().__init__(message)
        self.local = local


class UsageError(DDPTrainError):
    """A bad flag or config value (exit 2)."""

    exit_code = EXIT_USAGE


class Preempted(DDPTrainError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""

    exit_code = EXIT_PREEMPTED


class Interrupted(DDPTrainError):
    """Ctrl-C during a command that writes a file: the partial file is removed and the message says so."""

    exit_code = EXIT_INTERRUPTED
    names_rank = False  # a Ctrl-C reaches every rank: none to name

    def __init__(self, message: str) -> None:
        super().__init__(message, local=True)
