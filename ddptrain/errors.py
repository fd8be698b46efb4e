"""The exceptions ddptrain turns into one-line `error: ...` messages and exit codes."""

EXIT_RUNTIME = 1
EXIT_USAGE = 2
# EX_TEMPFAIL from sysexits.h: "try again later", which is what a preempted run should do (--resume auto).
EXIT_PREEMPTED = 75


class DDPTrainError(Exception):
    """A problem with the user's data, files or environment (exit 1)."""

    exit_code = EXIT_RUNTIME


class UsageError(DDPTrainError):
    """A bad flag or config value (exit 2)."""

    exit_code = EXIT_USAGE


class Preempted(DDPTrainError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""

    exit_code = EXIT_PREEMPTED
