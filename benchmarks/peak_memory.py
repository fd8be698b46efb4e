"""Peak memory of a ddptrain job: the summed PSS of all its processes (shared pages counted once per machine).

    python benchmarks/peak_memory.py -- python -m ddptrain fit --nproc-per-node 2 --data big.csv --epochs 1

Samples /proc/PID/smaps_rollup of the command and every process it started (the launcher's agent included) every
0.2 s and prints the peak of the sum with the wall time. PSS divides a shared page among the processes that map
it, so N ranks mapping one cached table, or forked from one agent that loaded torch, count it once where RSS would
count it N times.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[int, float, int, str]:
    """Run `command`; (exit code, seconds, peak summed PSS in bytes of all its processes, stderr)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(pss_bytes(p) for p in [proc.pid, *descendants(proc.pid)]))
        time.sleep(0.2)
    return proc.returncode, time.perf_counter() - started, peak, proc.stderr.read()


def main() -> int:
    command = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    code, seconds, peak, err = measure(command)
    print(f"exit {code}; {seconds:.1f} s; peak summed PSS of the job's processes {peak / 1e9:.2f} GB"
          + (f"\n{err[-500:]}" if code else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
