"""The launcher's environment, read in one place: torchrun's variables (rank, world, rendezvous address, elastic
attempt, agent store, error file) and the test fault hook. No torch here: the CLI and the console use it too.

`launch_env()` is strict (a partial set of variables is a usage error, not a hang) and is what the commands pass
along; `launch_env_lenient()` never raises, for the console and the failure path, which must work even then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ddptrain.errors import UsageError
from ddptrain.faults import InjectedFault, parse_fault

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # True under torchrun (or any launcher that sets the env:// variables)
    master_addr: str = ""
    master_port: str = ""
    run_id: str = ""  # torchrun's rendezvous id: the same on every rank, node and elastic restart
    restart_count: int = 0  # the elastic attempt; > 0 after torchrun restarted the workers
    agent_store: bool = False  # the rendezvous store is torchrun's agent's (it outlives every worker)
    error_file: str = ""  # where torchrun wants this worker's error (TORCHELASTIC_ERROR_FILE)
    fault: InjectedFault | None = None  # DDPTRAIN_FAIL_AT_STEP, for this rank (tests only)

    @property
    def restarted(self) -> bool:
        return self.restart_count > 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> LaunchEnv:
    """Read torchrun's variables; a partial set is a usage error, not a hang."""
    present = [name for name in LAUNCHER_VARS if name in os.environ]
    missing = [name for name in LAUNCHER_VARS if name not in os.environ]
    if present and missing:
        raise UsageError(f"partial launcher environment: {', '.join(present)} set but {', '.join(missing)} not; "
                         "launch with torchrun (or unset them to run as one process)")
    try:
        rank, local_rank, world = (int(os.environ.get(name, default))
                                   for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
        restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        raise UsageError("RANK, LOCAL_RANK, WORLD_SIZE and TORCHELASTIC_RESTART_COUNT must be integers; launch "
                         "with torchrun") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    try:
        fault = parse_fault(os.environ.get("DDPTRAIN_FAIL_AT_STEP", ""), rank)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return LaunchEnv(rank, local_rank, world, bool(present), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), "" if run_id == "none" else run_id, restart_count,
                     os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
                     os.environ.get("TORCHELASTIC_ERROR_FILE", ""), fault)


def launch_env_lenient() -> LaunchEnv:
    """The same, or as much of it as can be read (the console and the failure path must not fail)."""
    try:
        return launch_env()
    except UsageError:
        try:
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            rank = 0
        return LaunchEnv(rank=max(rank, 0))
