"""The one door to the process group: launcher environment, init/teardown, rank info, collectives.

Without torchrun the same code runs as a one-process group (a HashStore), so world size 1 and N share a path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from ddptrain.console import console
from ddptrain.errors import DDPTrainError
from ddptrain.launchenv import LaunchEnv, launch_env

DEFAULT_TIMEOUT_S = 1800.0  # torch's default for Gloo collectives and the env:// rendezvous


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def synchronize(self) -> None:
        """Wait for this rank's queued GPU work (before reading a clock); CPU work is already done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_device(cfg_device: str, cfg_backend: str, local_rank: int) -> tuple[torch.device, str]:
    cuda = torch.cuda.is_available()
    if cfg_device == "cuda" and not cuda:
        raise DDPTrainError("--device cuda but CUDA is not available here; use --device cpu (or auto)")
    if cfg_backend == "nccl" and not cuda:
        raise DDPTrainError("--backend nccl but CUDA is not available here; use --backend gloo (or auto)", local=True)
    use_cuda = cfg_device == "cuda" or (cfg_device == "auto" and (cuda and cfg_backend != "gloo"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DDPTrainError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node; "
                                "use --nproc-per-node <= the GPU count", local=True)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = cfg_backend if cfg_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    return device, backend


# Set once this process has had a process group. torch 2.13's DDP constructor (its C++ Reducer) keeps a reference
# to the Gloo process group that outlives destroy_process_group and the DDP object itself: the group's worker threads
# (pt_gloo_runloop) and its transport loop (gloo_tcp_loop) keep running until the process ends. At interpreter
# teardown, C++ static destructors then race those threads, and about one finished job in 70 died with
# "terminate called without an active exception" (SIGABRT) after its work was done and saved
# (benchmarks/exit_stress.py). Such a process leaves through `exit_process`, which skips that teardown.
HAD_PROCESS_GROUP = False
# A launched worker's process groups, kept from their C++ destructor until the process ends (through `exit_process`,
# which skips it). torch 2.13's ~ProcessGroupGloo joins the group's worker thread while holding the GIL, and that
# thread may still be freeing the last collectives' tensors, which takes the GIL: the finished rank then hung for
# good, its peer gone (once in ~30 two-process jobs of benchmarks/real_tables.py under load; gdb: the main thread in
# ~Reducer -> ~ProcessGroupGloo -> thread::join, pt_gloo_runloop in ~AsyncBarrierWork -> decref -> take_gil).
KEPT_GROUPS: list[Any] = []


def exit_process(code: int) -> None:
    """End this process with `code`: after a process group, without C++ teardown (os._exit, once every Python
    stream is flushed); otherwise the normal way."""
    if not HAD_PROCESS_GROUP:
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


@contextmanager
def process_group(device_name: str = "auto", backend_name: str = "auto", timeout_s: float | None = None,
                  env: LaunchEnv | None = None) -> Iterator[DistInfo]:
    """Set up the process group for this process and always tear it down."""
    env = env or launch_env()
    device, backend = resolve_device(device_name, backend_name, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if env.launched:
        # torch's own env:// rendezvous, with this attempt's keys under their own prefix: after an elastic
        # restart the store still holds the dead workers' Gloo addresses, and a new worker that read one would
        # wait on a peer that is gone.
        store = connect_store(env, timeout_s)
        torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f"ddptrain/attempt-{env.restart_count}",
                                                                            store),
                                      rank=env.rank, world_size=env.world_size, **kwargs)
    else:
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1, **kwargs)
    global HAD_PROCESS_GROUP
    HAD_PROCESS_GROUP = True
    console.rank = env.rank
    try:
        yield DistInfo(env.rank, env.local_rank, env.world_size, device, backend)
        if env.world_size > 1:
            torch_dist.barrier()  # leave together: a rank that exits first can abort a peer's Gloo teardown
    finally:
        if env.launched:  # see KEPT_GROUPS
            KEPT_GROUPS.append(torch_dist.group.WORLD)
        torch_dist.destroy_process_group()


def connect_store(env: LaunchEnv, timeout_s: float | None) -> torch_dist.Store:
    """torch's env:// rendezvous (a TCPStore at MASTER_ADDR:MASTER_PORT), within the timeout.

    torch's TCPStore client waits forever on a peer that accepts the connection but never answers, whatever its
    timeout says; so the connection is made in a helper thread (it releases the GIL) and abandoned at the deadline.
    """
    import threading

    limit = timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            result["store"] = next(torch_dist.rendezvous("env://", env.rank, env.world_size,
                                                         timeout=timedelta(seconds=limit)))[0]
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=connect, name="ddptrain-rendezvous", daemon=True)
    thread.start()
    thread.join(limit + 2)  # torch's own timeout, where it works, reports first
    if "error" in result:
        raise result["error"]
    if "store" not in result:
        where = f"{env.master_addr}:{env.master_port}"
        raise DDPTrainError(f"could not join the job's rendezvous at {where} within {limit:g} s "
                            "(--timeout): the peer there accepted the connection but never answered; check "
                            "MASTER_ADDR/MASTER_PORT and that the launcher on the first node is alive", local=True)
    return result["store"]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def start_all_reduce_sum(tensor: torch.Tensor) -> torch_dist.Work:
    """The same, in the background: `.wait()` on the result, then read `tensor`."""
    return torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, async_op=True)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out
