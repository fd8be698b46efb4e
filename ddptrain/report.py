"""The policy that turns any failure into one `error:` line per job and an
exit code: which kind it is, and which rank says it.

Ranks of a job often fail alike (the same bad flag or file), or one after another (a peer's exit breaks the
others' collectives). The first rank to fail claims the job's error line in the launcher's store (torchrun's agent
hosts it, so it answers even when rank 0 is slow, stopped or dead) and prints it; the rest stay silent. Every
failing worker also records its error in torchrun's error file (the JSON torch's `@record` writes), so torchrun's
own summary names the cause too.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from ddptrain.console import console
from ddptrain.errors import EXIT_RUNTIME, DDPTrainError, Interrupted
from ddptrain.launchenv import LaunchEnv, launch_env_lenient

PEER_GONE_GRACE_S = 2.0
PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "communicator was aborted")
CLAIM_TIMEOUT_S = 5.0


def is_a(exc: BaseException, class_name: str) -> bool:
    """Typer raises click's exceptions (or, in newer releases, its vendored copies): match them by name."""
    return any(cls.__name__ == class_name for cls in type(exc).__mro__)


def debug_requested() -> bool:
    return os.environ.get("DDPTRAIN_DEBUG", "") not in ("", "0") or "--debug" in sys.argv


def report(exc: BaseException) -> int:
    """Say what went wrong, once per job, and return the exit code."""
    if is_a(exc, "NoArgsIsHelpError"):
        return 0  # typer has printed the help
    if is_a(exc, "UsageError") and not isinstance(exc, DDPTrainError):  # a flag typer could not parse
        where = exc.ctx.command_path if getattr(exc, "ctx", None) else "ddptrain"
        say(f"{exc.format_message()} (see '{where} --help')", exc)
        return exc.exit_code
    if debug_requested():
        traceback.print_exc()
    if isinstance(exc, KeyboardInterrupt) or is_a(exc, "Abort"):
        exc = Interrupted("interrupted")
    if isinstance(exc, DDPTrainError):
        say(str(exc), exc, local=exc.local, prefix=exc.names_rank)
        return exc.exit_code
    if is_peer_failure(exc):  # another rank failed first and reported its own error
        record_error_file(exc, launch_env_lenient().error_file)
        if console.is_main:
            said = next(marker for marker in PEER_GONE if marker in str(exc).lower())  # is_peer_failure found one
            console.err.print(f"note: rank {console.rank} stopped because another rank went away ({said}); that "
                              "rank's own error, if it could print one, is above")
        # A peer killed by a signal says nothing: its launcher names it, if it sees that exit before this one
        # (its agent polls every 0.1 s and then ends the others).
        time.sleep(PEER_GONE_GRACE_S)
        return EXIT_RUNTIME
    if is_timeout(exc):
        say("a collective timed out: another rank is stuck or gone (the limit is --timeout); check the other "
            "ranks' logs", exc, local=True, prefix=False)
        return EXIT_RUNTIME
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    say(f"{type(exc).__name__}: {first_line} (rerun with --debug for the traceback)", exc, local=True)
    return EXIT_RUNTIME


def say(text: str, exc: BaseException, local: bool = False, prefix: bool | None = None) -> None:
    """Print the job's one error line if this rank is the first to fail. `local`: a failure of this rank alone
    (its device, its disk, its own crash): shown with its rank when the job has several."""
    env = launch_env_lenient()
    record_error_file(exc, env.error_file, text)
    several = env.world_size > 1
    first = claim_error_line(env) if several else True
    if first is None:  # no launcher store to ask: rank 0 speaks for shared errors, each rank for its own
        first = console.is_main or local
    if first:
        show_rank = several and (local if prefix is None else prefix)
        console.error(f"[rank {console.rank}] {text}" if show_rank else text, any_rank=True)


def claim_error_line(env: LaunchEnv) -> bool | None:
    """True for the first rank of this job (and elastic attempt) to ask, False for the others; None when the
    launcher's store cannot be asked (not torchrun's agent store, or it does not answer)."""
    if not env.agent_store:
        return None
    try:
        import threading
        from datetime import timedelta

        from torch.distributed import TCPStore

        key = f"ddptrain/error-line/{env.run_id}/{env.restart_count}"
        answer: dict[str, int] = {}

        def ask() -> None:  # in a thread: torch's TCPStore client can wait past its timeout
            store = TCPStore(env.master_addr, int(env.master_port), is_master=False,
                             timeout=timedelta(seconds=CLAIM_TIMEOUT_S), wait_for_workers=False)
            answer["count"] = store.add(key, 1)

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        thread.join(CLAIM_TIMEOUT_S + 1)
        return answer["count"] == 1 if "count" in answer else None
    except Exception:
        return None


def record_error_file(exc: BaseException, path: str, text: str | None = None) -> None:
    """torchrun's per-worker error file (TORCHELASTIC_ERROR_FILE), in the JSON that torch's `@record` writes, so
    torchrun's failure summary shows the cause instead of `error_file: <N/A>`. Its "traceback" field holds the
    one-line message (the Python traceback only with --debug): a user error is not a crash."""
    if not path:
        return
    line = text or (str(exc).splitlines() or [type(exc).__name__])[0]
    try:
        with open(path, "w") as handle:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": traceback.format_exc() if debug_requested() else line,
                "timestamp": str(int(time.time()))}}}, handle)
    except OSError:
        pass  # the error line itself matters more than torchrun's summary


def is_collective_failure(exc: BaseException) -> bool:
    """torch's distributed errors (DistError and its kinds), or the RuntimeError Gloo raises in a collective."""
    return any(cls.__name__ in ("DistError", "RuntimeError") for cls in type(exc).__mro__)


def is_peer_failure(exc: BaseException) -> bool:
    """A collective broken because another rank exited: that rank reports its own error. torch gives the same type
    (DistBackendError or RuntimeError) for every collective failure, so the kind comes from its message."""
    if not is_collective_failure(exc):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in PEER_GONE)


def is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    if not is_collective_failure(exc):
        return False
    text = str(exc).lower()
    # Gloo says "Application timeout caused pair closure" when a background (async) collective times out.
    return ("timed out" in text or "timeout caused pair closure" in text
            or "timeout" in text and ("gloo" in text or "nccl" in text or "wait" in text))
