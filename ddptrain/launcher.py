"""`ddptrain fit --nproc-per-node N`: start N local workers through torch's own launcher (torchrun's code).

`--standalone` makes torchrun's c10d rendezvous bind a free port, so two jobs on one machine never meet.
"""

from __future__ import annotations

import os
import signal

from ddptrain.console import console
from ddptrain.errors import EXIT_PREEMPTED


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch_local(nproc: int, fit_argv: list[str]) -> int:
    """Run `python -m ddptrain fit ...` on `nproc` workers; return the job's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's own default for several workers, set here so it does not print a warning about it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "ddptrain", "fit", *fit_argv])
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: the worker could not say why, so we do
            name = signal.Signals(-failure.exitcode).name
            console.error(f"worker rank {rank} was killed by {name}")
            return 1
        return failure.exitcode  # the worker printed its own one-line error
    except SignalException:
        return EXIT_PREEMPTED  # the workers' rank 0 has said where its checkpoint is
    return 0
