"""`python -m ddptrain ARGS` in a process forked from a server that has imported what ddptrain imports: the same
process a user's command is, without paying torch's import (~2.4 s of CPU) and torch._dynamo's (~1.4 s) again for
every command a test runs. It is how `fit --nproc-per-node` starts its workers (launcher.py), and what a test of
import-time behaviour must not use (`ddptrain --help` keeps torch out: test_cli runs a fresh interpreter).

One server per test process, on a Unix socket. Per command the server forks a waiter, which forks the command: the
command process gets the caller's argv, working folder, environment and standard streams (passed as descriptors),
runs the CLI's entry point and exits with its code; the waiter sends the command's pid, then its exit status.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ("torch", "torch._dynamo", "torch.nn.parallel", "torch.optim", "torch.distributed.run", "ddptrain.cli",
           "ddptrain.run", "ddptrain.evaluate", "ddptrain.launcher", "pyarrow.csv", "pyarrow.parquet")


def serve(path: str) -> None:
    import ctypes
    import importlib

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the server ends with its test process

    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            wait_for_command(conn)  # never returns
        conn.close()


def wait_for_command(conn: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_command(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        conn.sendall(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    finally:
        os._exit(0)


def run_command(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        from ddptrain import console

        console.console.__init__()  # what the new environment and streams make of rank and terminal
        sys.argv = ["ddptrain", *request["argv"]]
        from ddptrain.cli import entry

        try:
            entry()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class Server:
    """The server of this test process, started on first use."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="ddptrain-forkserver-")
        self.path = os.path.join(self.folder, "socket")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                         f"import forkserver; forkserver.serve({self.path!r})"],
                                        stdout=subprocess.PIPE, env=env, start_new_session=True)
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("the test fork server did not start")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


_server: Server | None = None


def server() -> Server:
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = Server()
    return _server


def stop() -> None:
    if _server is not None:
        _server.close()


class Forked:
    """A started command: its pid, and `wait` for its exit code (like subprocess.Popen's)."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], stdin: int, stdout: int, stderr: int) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(server().path)
        request = json.dumps({"argv": list(argv), "cwd": str(cwd), "env": env}).encode()
        socket.send_fds(self.conn, [request], [stdin, stdout, stderr])
        self.reader = self.conn.makefile("rb")
        self.pid = json.loads(self.reader.readline())["pid"]
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.conn.settimeout(timeout)
            try:
                line = self.reader.readline()
            except TimeoutError:  # the socket's reader is spent: kill() is all that is left to do
                raise subprocess.TimeoutExpired(["ddptrain"], timeout) from None
            self.returncode = json.loads(line)["code"] if line else -signal.SIGKILL
            self.conn.close()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(..., capture_output=True, text=True) for `python -m ddptrain ARGV`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull, "rb") as null:
        forked = Forked(argv, cwd, env, null.fileno(), out.fileno(), err.fileno())
        try:
            code = forked.wait(timeout)
        except subprocess.TimeoutExpired:
            forked.kill()
            code = None
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode("utf-8", "replace") for f in (out, err))
        if code is None:  # what it printed before it was killed: the clue to where it stuck
            raise CommandTimeout(["ddptrain", *argv], timeout, stdout, stderr)
        return subprocess.CompletedProcess(["ddptrain", *argv], code, stdout, stderr)


class CommandTimeout(subprocess.TimeoutExpired):
    def __str__(self) -> str:
        tail = lambda text: "\n".join(text.splitlines()[-20:])  # noqa: E731
        return f"{super().__str__()}\n--- its stdout (end) ---\n{tail(self.stdout)}\n--- its stderr (end) ---\n" \
               f"{tail(self.stderr)}"
