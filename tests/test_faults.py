"""Faults with real processes and real signals: preemption, elastic restarts, multi-node rendezvous."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LAUNCHERS, clean_env, error_lines, nproc_cmd, read_metrics, run_command, shared_run, torchrun_cmd

from ddptrain.checkpoint import load_checkpoint

# ~20 steps an epoch; small enough for CI, long enough to be interrupted mid-run (and never stopped early: blobs'
# validation loss stops improving within a few epochs)
LONG = ["fit", "--data", "blobs", "--n-samples", "6000", "--n-features", "8", "--n-classes", "4", "--hidden", "64,64",
        "--batch-size", "256", "--epochs", "6", "--optimizer", "sgd", "--lr", "0.05", "--log-every", "2",
        "--checkpoint-every", "5", "--val-fraction", "0.1", "--early-stop", "0"]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (waiting for its parent to collect its exit status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (run_dir / "metrics.jsonl").exists():
            rows = [r for r in read_metrics(run_dir) if r["kind"] == "step"]
            if rows and rows[-1]["step"] >= steps:
                return
        time.sleep(0.05)
    raise AssertionError("training did not progress")


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STARTED: list[subprocess.Popen] = []


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own, so killing
    the launcher's process group does not reach them; SIGKILL also ends a worker frozen by SIGSTOP)."""
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(autouse=True)
def kill_leftovers():
    """A failed test must not leave a job (and its workers) running into the next one."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(args, cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    STARTED.append(proc)
    return proc


def straight_run(root: Path, args: list[str] = LONG) -> dict:
    """The weights of `args` run straight through on 2 processes: the reference of the interrupted runs (whichever
    launcher started them: both start the same workers)."""
    run, _ = shared_run(root, nproc_cmd(2, *args, "--out", "straight", "--quiet"), "straight")
    return weights(run / "checkpoints/last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigterm_checkpoints_exits_promptly_and_resumes_exactly(tmp_path, launcher, shared_root):
    reference = straight_run(shared_root)
    proc = start(LAUNCHERS[launcher](2, *LONG, "--out", "run"), tmp_path)
    wait_for_steps(tmp_path / "run", 12, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 25
    assert proc.returncode == (75 if launcher == "nproc-per-node" else 1)  # torchrun's own code for any failure
    assert "preempted by SIGTERM" in err, err[-2000:]
    assert launcher == "torchrun" or "Traceback" not in err  # torchrun prints its agent's own
    assert len([line for line in error_lines(err) if "preempted" in line]) == 1
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert 0 < state["position"]["global_step"] < 6 * 21
    resumed = run_command(nproc_cmd(2, *LONG, "--out", "run", "--resume", "auto", "--quiet"), tmp_path, clean_env(),
                          240)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(reference, weights(tmp_path / "run/checkpoints/last.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_signal_to_one_worker_stops_every_rank_at_the_same_step(tmp_path, launcher):
    proc = start(LAUNCHERS[launcher](2, *LONG, "--out", "run"), tmp_path)
    wait_for_steps(tmp_path / "run", 8, proc)
    workers = sorted(children(proc.pid))
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # the scheduler signals one process only
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    lines = error_lines(err)
    assert len(lines) == 1 and "preempted by" in lines[0], err[-2000:]
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    step = state["position"]["global_step"]
    # the checkpoint is the step every rank stopped at: the error names it, and both ranks' random streams were
    # gathered into it by the same collective call
    assert f"at step {step};" in lines[0]
    assert len(state["rng"]) == 2 and step >= 8
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "step"][-1] <= step


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_elastic_restart_after_sigkill_finishes_with_the_same_weights(tmp_path, launcher, shared_root):
    reference = straight_run(shared_root)
    if launcher == "torchrun":
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "--max-restarts=2", "-m", "ddptrain", *LONG, "--out", "run"]
    else:  # the workers are forked again from the agent
        args = LAUNCHERS[launcher](2, *LONG, "--max-restarts", "2", "--out", "run")
    proc = start(args, tmp_path)
    wait_for_steps(tmp_path / "run", 30, proc)
    victim = sorted(children(proc.pid))[1]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out
    assert same_weights(reference, weights(tmp_path / "run/checkpoints/last.pt"))
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert epochs == list(range(1, 7))


@pytest.mark.slow
def test_spent_restart_budget_exits_non_zero_naming_the_rank(tmp_path):
    env = clean_env(DDPTRAIN_FAIL_AT_STEP="1:3")
    result = run_command(nproc_cmd(2, *LONG, "--max-restarts", "1", "--out", "run"), tmp_path, env, 180)
    assert result.returncode != 0
    # the first attempt and the one restart both fail, each saying so
    assert result.stderr.count("error: [rank 1] RuntimeError: injected failure at step 3") == 2, result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_agents_on_loopback_train_like_one_agent_with_two_processes(tmp_path, launcher, shared_root):
    short = LONG[:LONG.index("--epochs")] + ["--epochs", "2"] + LONG[LONG.index("--epochs") + 2:]
    reference = straight_run(shared_root, short)
    port = free_port()
    if launcher == "torchrun":
        commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                     "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                     f"--node-rank={i}", "-m", "ddptrain", *short, "--out", "two", "--quiet"] for i in range(2)]
    else:  # each machine runs the same command; the run folder is runs/run-<id> on both
        commands = [LAUNCHERS[launcher](1, *short, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                        "--rdzv-id", "two-nodes", "--quiet")] * 2
    agents = [start(command, tmp_path) for command in commands]
    for agent in agents:
        out, err = agent.communicate(timeout=240)
        assert agent.returncode == 0, err[-3000:]
    two = tmp_path / ("two" if launcher == "torchrun" else "runs/run-two-nodes")
    assert same_weights(reference, weights(two / "checkpoints/last.pt"))


SINGLE = ["-m", "ddptrain", *LONG]


@pytest.mark.slow
def test_ctrl_c_once_checkpoints_and_exits_75(tmp_path):
    proc = start([sys.executable, *SINGLE, "--out", "run"], tmp_path)
    wait_for_steps(tmp_path / "run", 6, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert error_lines(err) and "preempted by SIGINT" in error_lines(err)[0]
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["position"]["global_step"] >= 6


def replaced(args: list[str], **values: str) -> list[str]:
    out = list(args)
    for flag, value in values.items():
        out[out.index("--" + flag.replace("_", "-")) + 1] = value
    return out


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path):
    # long epochs and a long --log-every: the first Ctrl-C waits for the next sync point, the second must not
    slow = replaced(SINGLE, n_samples="60000", batch_size="8", log_every="100000", checkpoint_every="100000")
    proc = start([sys.executable, *slow, "--out", "run"], tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    # at once: not after the next --log-every sync point, which this run never reaches (room for a loaded machine)
    assert time.monotonic() - sent < 20
    assert proc.returncode == 130


# -- one error line per job, from whichever rank knows -----------------------------------------------------------
def stderr_until_error(args: list[str], cwd: Path, env: dict, settle: float = 3.0, timeout: float = 120) -> str:
    """Run a job until its first `error:` line, give the other ranks `settle` seconds to print theirs, then end it.

    (torchrun's agent waits 30 s before it SIGKILLs a frozen or stuck worker, whatever its --shutdown-timeout
    says; the test need not.)"""
    log = cwd / "stderr.txt"
    with open(log, "w") as handle:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=handle,
                                start_new_session=True)
    STARTED.append(proc)
    deadline = time.monotonic() + timeout
    while "error:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        proc.wait(timeout=settle)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # the frozen rank 0 included
        proc.wait()
    return log.read_text()


@pytest.mark.slow
def test_rank_0_stopped_at_start_rank_1_reports_the_bad_input_once(tmp_path):
    """Rank 0 is frozen (a real SIGSTOP) before it reads anything; rank 1 meets the bad --data and must say so."""
    err = stderr_until_error(torchrun_cmd(2, "fit", "--data", "nope.csv", "--out", "run"), tmp_path,
                             clean_env(DDPTRAIN_FAIL_AT_STEP="0:0:stop"))
    assert error_lines(err) == ["error: data file nope.csv does not exist; check the path"], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_stuck_peer_becomes_an_error_within_the_timeout(tmp_path):
    """Rank 1 stops answering at step 4 (a loop that never reaches the next collective): rank 0 reports it once
    the --timeout (5 s, instead of torch's 30-minute default) has passed, timed from the start of training
    (config.json is written just before the first step), not from process start-up on a loaded machine."""
    err = stderr_until_error(torchrun_cmd(2, *LONG, "--out", "run", "--timeout", "5"), tmp_path,
                             clean_env(DDPTRAIN_FAIL_AT_STEP="1:4:hang"))
    assert time.time() - (tmp_path / "run/config.json").stat().st_mtime < 60
    assert error_lines(err) == [
        "error: a collective timed out: another rank is stuck or gone (the limit is --timeout); check the other "
        "ranks' logs"], err[-3000:]


@pytest.mark.slow
def test_rank_0_stopped_mid_run_rank_1_reports_the_timeout(tmp_path):
    """As the stuck peer above, with the workers of --nproc-per-node (forked from its agent) in place of torchrun's."""
    err = stderr_until_error(nproc_cmd(2, *LONG, "--out", "run", "--timeout", "5"), tmp_path,
                             clean_env(DDPTRAIN_FAIL_AT_STEP="0:4:stop"))
    assert error_lines(err) == [
        "error: a collective timed out: another rank is stuck or gone (the limit is --timeout); check the other "
        "ranks' logs"], err[-3000:]


@pytest.mark.slow
def test_one_rank_failing_prints_its_error_once_and_ends_the_job(tmp_path):
    """Under --nproc-per-node (torchrun's case: test_distributed's test_one_rank_raising_ends_the_job...)."""
    result = run_command(LAUNCHERS["nproc-per-node"](2, *LONG, "--out", "run"), tmp_path,
                         clean_env(DDPTRAIN_FAIL_AT_STEP="1:3"), 120)
    assert result.returncode == 1
    assert error_lines(result.stderr) == ["error: [rank 1] RuntimeError: injected failure at step 3 "
                                          "(DDPTRAIN_FAIL_AT_STEP) (rerun with --debug for the traceback)"]
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_is_named_and_ends_the_job(tmp_path):
    proc = start(LAUNCHERS["nproc-per-node"](2, *LONG, "--out", "run"), tmp_path)
    wait_for_steps(tmp_path / "run", 6, proc)
    workers = sorted(children(proc.pid))
    assert len(workers) == 2
    sent = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=90)
    assert time.monotonic() - sent < 60  # torch's agent ends the survivor (SIGTERM, SIGKILL after 30 s)
    assert proc.returncode == 1
    assert "error: worker rank 1 was killed by SIGKILL" in error_lines(err), err[-3000:]
    assert "Traceback" not in err


def test_a_signal_reaching_a_worker_before_its_own_handlers_ends_it_as_they_would():
    """A forked worker keeps the agent's forwarding handler until run_worker replaces it: a SIGTERM in between (the
    agent passing on one that came before the workers existed) must end the worker as its own handler would, not
    be kept as the worker's 'pending' signal and lost. A real fork, a real signal, run_agent's real handler."""
    from ddptrain.launcher import run_agent

    statuses: list[int] = []

    def launch() -> None:  # torch's agent stands here: it forks a worker, which is signalled at once
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            os._exit(0)  # the signal was lost
        statuses.append(os.waitpid(pid, 0)[1])

    failure, received = run_agent(launch)
    assert failure is None
    assert os.WIFSIGNALED(statuses[0]) and os.WTERMSIG(statuses[0]) == signal.SIGTERM
    assert received == []  # nothing reached the agent itself


@pytest.mark.slow
def test_sigterm_before_training_began_says_so_once_and_exits_143(tmp_path):
    """SIGTERM while the workers start (rank 0 held at the start of fit, before its handler is in place, where a
    slow data read or rendezvous holds a real job): the workers end by it, and the job says that it was stopped, not
    that a worker was killed, with the exit code of one process ended by SIGTERM."""
    proc = start(LAUNCHERS["nproc-per-node"](2, *LONG, "--out", "run"), tmp_path,
                 clean_env(DDPTRAIN_FAIL_AT_STEP="0:0:hang"))
    deadline = time.monotonic() + 60
    while len(children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # rank 0 holds at step 0; rank 1 waits for it
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-3000:]
    assert error_lines(err) == ["error: stopped by SIGTERM before training began (nothing to checkpoint); the same "
                                "command starts the job again"], err[-3000:]
    assert not (tmp_path / "run/checkpoints").exists() or not list((tmp_path / "run/checkpoints").iterdir())


@pytest.mark.slow
def test_ctrl_c_on_a_terminal_reaches_the_ranks_once_checkpoints_and_exits_75(tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group: the agent passes it on to its workers once
    (they are in sessions of their own), so it is a first Ctrl-C (checkpoint), not a second (abort)."""
    proc = start(LAUNCHERS["nproc-per-node"](2, *LONG, "--out", "run"), tmp_path)
    wait_for_steps(tmp_path / "run", 6, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-3000:]
    assert len(error_lines(err)) == 1 and "preempted by SIGINT" in error_lines(err)[0], err[-3000:]
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["position"]["global_step"] >= 6


@pytest.mark.slow
def test_second_ctrl_c_on_a_terminal_aborts_every_rank_at_once(tmp_path):
    slow = replaced(LONG, n_samples="60000", batch_size="8", log_every="100000", checkpoint_every="100000")
    proc = start(LAUNCHERS["nproc-per-node"](2, *slow, "--out", "run"), tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "config.json").exists() and time.monotonic() < deadline:  # training has begun
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 20  # not after the next sync point, which this run never reaches
    assert proc.returncode == 130, err[-3000:]
    assert error_lines(err) == ["error: interrupted"], err[-3000:]


@pytest.mark.slow
def test_workers_checkpoint_and_stop_when_their_agent_is_killed(tmp_path):
    endless = replaced(LONG, epochs="100000")  # still training whenever the agent dies
    proc = start(LAUNCHERS["nproc-per-node"](2, *endless, "--out", "run"), tmp_path)
    wait_for_steps(tmp_path / "run", 6, proc)
    workers = sorted(children(proc.pid))
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() < deadline, "the workers outlived their agent"
    err = proc.stderr.read()  # the workers wrote to the same pipe; all are gone now
    assert len(error_lines(err)) == 1 and "preempted by SIGTERM" in error_lines(err)[0], err[-3000:]
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["position"]["global_step"] >= 6


def test_sigterms_after_a_sigterm_stop_are_ignored_until_the_process_ends():
    """A worker whose agent died gets a SIGTERM for each of the agent's threads as they end, some after training
    stopped: those must not kill it before it has checkpointed and said so (they did, silently, under load)."""
    script = (
        "import os, signal, time\n"
        "from ddptrain.signals import StopRequest\n"
        "stop = StopRequest().install()\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
        "assert stop.signal_name == 'SIGTERM'\n"
        "stop.uninstall()\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
        "print('still here')\n"
        "other = StopRequest().install(); other.uninstall()\n"  # no stop asked: the previous handler comes back
        "assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL); StopRequest().install().uninstall()\n"
        "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=clean_env())
    assert done.returncode == 0 and done.stdout == "still here\n", (done.returncode, done.stderr)


@pytest.mark.slow
def test_all_ranks_failing_alike_print_one_line_and_torchrun_names_the_cause(tmp_path):
    result = subprocess.run(torchrun_cmd(2, "fit", "--data", "xor", "--hidden", "abc", "--out", "run"), cwd=tmp_path,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1  # torchrun's own code for a failed worker
    assert len(error_lines(result.stderr)) == 1 and "--hidden 'abc'" in error_lines(result.stderr)[0]
    assert "error_file: <N/A>" not in result.stderr  # the workers' error files reached torchrun's summary


@pytest.mark.slow
def test_a_silent_rendezvous_peer_is_an_error_within_the_timeout(tmp_path):
    """A MASTER_ADDR:MASTER_PORT that accepts connections and never answers (torch's TCPStore would wait forever)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    env = clean_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    started = time.monotonic()
    try:
        result = run_command([sys.executable, "-m", "ddptrain", "fit", "--data", "xor", "--timeout", "3", "--out",
                              "run"], tmp_path, env, 120)
    finally:
        server.close()
    assert time.monotonic() - started < 120  # a 3 s limit, not torch's forever; room for a loaded machine
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"error: [rank 1] could not join the job's rendezvous at 127.0.0.1:{port} within 3 s (--timeout): the peer "
        "there accepted the connection but never answered; check MASTER_ADDR/MASTER_PORT and that the launcher on "
        "the first node is alive"], result.stderr


# -- the run folder is locked for the job's life -------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_job_on_a_held_folder_fails_at_once_and_sigkill_releases_it(tmp_path):
    endless = replaced(SINGLE, epochs="100000")
    first = start([sys.executable, *endless, "--out", "run"], tmp_path)
    wait_for_steps(tmp_path / "run", 2, first)
    for args in (["--out", "run"], ["--out", "run", "--resume", "auto"]):
        second = run_command([sys.executable, *endless, *args], tmp_path, clean_env(), 120)
        lines = error_lines(second.stderr)
        assert len(lines) == 1, second.stderr
        if "--resume" in args:
            assert second.returncode == 1
            assert f"in use by another ddptrain job (host {socket.gethostname()}, pid {first.pid}," in lines[0]
        else:
            assert second.returncode == 2 and "already holds a run" in lines[0]
    assert first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    # the kernel released the dead job's lock: the run continues (to epoch 2, or it is there already)
    resumed = run_command([sys.executable, *replaced(endless, epochs="2"), "--out", "run", "--resume", "auto",
                           "--quiet"], tmp_path, clean_env(), 240)
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_two_jobs_started_at_once_on_one_folder_one_runs_one_is_refused(tmp_path):
    endless = replaced(SINGLE, epochs="100000")
    jobs = [start([sys.executable, *endless, "--out", "run", "--resume", "auto", "--quiet"], tmp_path)
            for _ in range(2)]
    deadline = time.monotonic() + 120
    while all(job.poll() is None for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    loser = next(job for job in jobs if job.poll() is not None)
    winner = next(job for job in jobs if job is not loser)
    err = loser.communicate()[1]
    assert loser.returncode == 1 and error_lines(err) and "is in use by another ddptrain job" in err, err
    wait_for_steps(tmp_path / "run", 30, winner)
    winner.send_signal(signal.SIGKILL)
    winner.wait()
    steps = [row["step"] for row in read_metrics(tmp_path / "run") if row["kind"] == "step"]
    assert steps == sorted(set(steps))  # one run's log, not two interleaved
