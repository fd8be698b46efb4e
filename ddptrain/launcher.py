"""`ddptrain fit --nproc-per-node N`: start N local workers through torch's own launcher (torchrun's elastic agent).

On one machine its c10d rendezvous binds a free port (torchrun's `--standalone`), so two jobs never meet; on
several, every node's `ddptrain fit --nnodes M --rdzv-endpoint HOST:PORT` meets at the endpoint (torchrun's c10d
rendezvous), and `--max-restarts K` restarts a failed worker group (workers resume from the last checkpoint).

On a machine without CUDA devices the workers are forked from the agent once it has imported what a worker runs
(torch, DDP, ddptrain's training code): the machine then holds one copy of those pages, not one per rank, and no
worker imports torch again. (`torchrun -m ddptrain` starts fresh interpreters: ~200 MB private each, RESULTS.md.)
The agent has run no tensor operation by then, so no thread pool breaks in a child; with CUDA devices present, or
`DDPTRAIN_WORKER_START=spawn`, the workers are spawned instead (a child may not use CUDA its parent touched).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING

from ddptrain.console import console
from ddptrain.errors import UsageError

if TYPE_CHECKING:
    from ddptrain.config import FitConfig

# what every worker imports, loaded once in the agent before it forks them
WORKER_MODULES = ("torch", "torch._dynamo", "torch.nn.parallel", "torch.optim", "ddptrain.run", "pyarrow",
                  "pyarrow.csv", "pyarrow.parquet", "pyarrow.feather", "pyarrow.json")
START_METHODS = ("fork", "spawn")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@dataclass(frozen=True)
class Launch:
    """How `fit` starts its workers: `nproc` a node; `nnodes` ("2", or "1:4" for an elastic range) meeting at
    `endpoint` (HOST:PORT, the same on every node; None: this machine alone, on a free port) under `run_id`;
    `max_restarts` restarts of a failed worker group."""

    nproc: int
    nnodes: str = "1"
    endpoint: str | None = None
    run_id: str = ""
    max_restarts: int = 0

    @classmethod
    def checked(cls, nproc: int | None, nnodes: str | None, endpoint: str | None, run_id: str | None,
                max_restarts: int) -> Launch:
        """From `fit`'s flags, each checked (a usage error names the flag and the fix)."""
        if nproc is None:
            flag = next(flag for flag, value in (("--nnodes", nnodes), ("--rdzv-endpoint", endpoint),
                                                 ("--rdzv-id", run_id), ("--max-restarts", max_restarts or None))
                        if value is not None)
            raise UsageError(f"{flag} starts workers: give --nproc-per-node N with it")
        if nproc < 1:
            raise UsageError(f"--nproc-per-node {nproc} must be at least 1")
        if max_restarts < 0:
            raise UsageError(f"--max-restarts {max_restarts} must be 0 or more")
        counts = (nnodes or "1").split(":")
        if not (1 <= len(counts) <= 2 and all(c.isdigit() and int(c) >= 1 for c in counts)
                and int(counts[0]) <= int(counts[-1])):
            raise UsageError(f"--nnodes {nnodes!r} must be a node count (2) or a range (1:4)")
        if endpoint is None:
            if counts != ["1"]:
                raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the same on every node (the "
                                 "first node's address and a free port)")
            if run_id is not None:
                raise UsageError("--rdzv-id goes with --rdzv-endpoint")
            return cls(nproc, max_restarts=max_restarts)
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--rdzv-endpoint {endpoint!r} must be HOST:PORT (e.g. node0:29500)")
        if run_id is not None and not run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UsageError(f"--rdzv-id {run_id!r} must be letters, digits, '-', '_' or '.' (a job id)")
        return cls(nproc, nnodes or "1", endpoint, run_id or f"ddptrain-{host}-{port}".replace(":", "-"),
                   max_restarts)

    def torchrun_args(self) -> list[str]:
        common = [f"--nproc-per-node={self.nproc}", f"--max-restarts={self.max_restarts}"]
        if self.endpoint is None:
            return ["--standalone", *common]
        return [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={self.run_id}", *common]


def start_method() -> str:
    """fork, unless CUDA devices may be here (a CUDA or ROCm build, and /dev/nvidia* or /dev/kfd) or the user asks
    otherwise (DDPTRAIN_WORKER_START)."""
    import torch

    asked = os.environ.get("DDPTRAIN_WORKER_START", "")
    if asked:
        if asked not in START_METHODS:
            raise UsageError(f"DDPTRAIN_WORKER_START={asked!r} is not one of {', '.join(START_METHODS)}")
        return asked
    gpu_build = torch.version.cuda is not None or torch.version.hip is not None
    try:
        devices = any(name.startswith(("nvidia", "kfd")) for name in os.listdir("/dev"))
    except OSError:  # no /dev to read: assume devices rather than risk a fork
        devices = True
    return "spawn" if gpu_build and devices else "fork"


def worker_config(launch: Launch, cfg: FitConfig) -> FitConfig:
    """What every worker runs: this command's resolved settings (flags and --config read once, here), with the run
    folder named here when it is the default (alone on a machine the workers' own default would be a timestamp
    each; on several machines it is runs/run-<rendezvous id>, the same on every one)."""
    if cfg.out is None and launch.endpoint is None:
        from ddptrain.launchenv import launch_env
        from ddptrain.rundir import default_out

        return replace(cfg, out=str(default_out(launch_env())))
    return cfg


def launch_local(launch: Launch, cfg: FitConfig, started_at: float) -> int:
    """Run `fit` with `cfg` on this node's workers; return the job's exit code."""
    cfg = worker_config(launch, cfg)
    # torchrun's own default for several workers, set before torch loads (OpenMP reads it then), and here so it
    # does not print a warning about it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import gc
    import importlib
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args([*launch.torchrun_args(), "--module", "ddptrain", "fit"])  # the workers run run_worker
    if launch.endpoint is None:  # what torchrun's run() does for --standalone
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    config, _, _ = config_from_args(args)
    config.start_method = start_method()
    # a failed worker has printed its own one-line error; torch's own report of it is a traceback of the agent's
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if config.start_method == "fork":
        for name in WORKER_MODULES:
            importlib.import_module(name)
        gc.collect()
        gc.freeze()  # the shared objects' pages stay shared: the collector no longer writes to them
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or each forked worker would print the agent's buffered text again
    failure, received = run_agent(lambda: elastic_launch(config, entrypoint=run_worker)(cfg, started_at, os.getpid()))
    if isinstance(failure, ChildFailedError):
        rank, first = failure.get_first_failure()
        if first.exitcode < 0 and -first.exitcode in received:  # the job's own signal, passed on
            name = signal.Signals(-first.exitcode).name
            when = " before training began (nothing to checkpoint)" if name in ("SIGTERM", "SIGINT") else ""
            console.error(f"stopped by {name}{when}; the same command starts the job again")
            return 128 - first.exitcode  # as a shell reports a process the signal ended
        if first.exitcode < 0:  # killed by a signal: the worker could not say why, so we do
            console.error(f"worker rank {rank} was killed by {signal.Signals(-first.exitcode).name}")
            return 1
        return first.exitcode  # the worker printed its own one-line error
    if failure is not None:
        raise failure
    return 0


def run_agent(launch: Callable[[], object]) -> tuple[BaseException | None, list[int]]:
    """Run torch's agent (`launch`) in a helper thread, so that it sets no signal handlers of its own, while this
    thread passes each signal it receives on to the workers once: a first Ctrl-C or SIGTERM checkpoints and a
    second aborts, as in one process. (torch's own handling ends the workers with SIGTERM when a second signal
    interrupts its shutdown.) Returns what `launch` raised, if anything, and the signals this process received. A
    worker still starting has no handler yet: the signal ends it, as it ends `fit` in one process."""
    import multiprocessing
    import threading

    outcome: list[BaseException] = []
    received: list[int] = []
    pending: list[int] = []  # received before the workers existed

    def agent() -> None:
        try:
            launch()
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    agent_pid = os.getpid()

    def forward(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != agent_pid:
            # a worker just forked, before run_worker set its own handlers: the signal is this worker's, handled as
            # those handlers would (kept as pending here, it would be lost)
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        workers = multiprocessing.active_children()
        if not workers:
            pending.append(signum)
        for worker in workers:
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    thread = threading.Thread(target=agent, name="ddptrain-agent")
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
            if pending and multiprocessing.active_children():
                for signum in pending:
                    forward(signum, None)
                pending.clear()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return (outcome[0] if outcome else None), received


def run_worker(cfg: FitConfig, started_at: float, agent_pid: int) -> int:
    """One worker: `fit` with `cfg`, in the environment torch's agent set for its rank; a failure is the job's one
    error line (report.py), as in `ddptrain fit`.

    Success returns (torch's agent waits for every worker's return value); a failure ends the process with its
    exit code, which the agent reports as the job's."""
    os.setsid()  # as torchrun's workers: a terminal's Ctrl-C reaches the agent, which passes it on once
    for sig in FORWARDED_SIGNALS[1:]:
        signal.signal(sig, signal.SIG_DFL)  # a forked worker has the agent's handlers
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_with(agent_pid)
    from ddptrain import dist
    from ddptrain.launchenv import launch_env_lenient
    from ddptrain.report import report
    from ddptrain.run import fit

    console.rank = launch_env_lenient().rank
    try:
        fit(cfg, started_at)  # the time to the first step counts from the command's start, in the agent
    except (Exception, KeyboardInterrupt) as exc:
        dist.exit_process(report(exc))
    return 0


def stop_with(agent_pid: int) -> None:
    """Linux: this worker gets SIGTERM (checkpoint and stop, as when preempted) if its agent dies, e.g. killed by
    the OOM killer. A worker would otherwise train on unwatched, and one that finished would wait for ever for the
    agent's go-ahead to exit. (SIGTERM, not SIGINT: the kernel sends it once for each of the agent's threads that
    ends, and a second SIGINT would abort without a checkpoint.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != agent_pid:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
