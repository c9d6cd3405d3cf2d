"""Re-launching on N processes, joining torchrun/SLURM groups, and failing fast (CPU, gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.distributed.toy_cli import rows_for
from unicom_cli.distributed import launch
from unicom_cli.distributed.env import GroupEnv, detect_group, parse_nodelist
from unicom_cli.distributed.launch import LaunchConfig, run_command
from unicom_cli.errors import DistributedError, UsageError

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "TORCHELASTIC_RUN_ID", "UNICOM_ERROR_DIR", "UNICOM_DIST_BACKEND", "UNICOM_LAUNCHER_PID")


# Deadlines catch hangs, never slowness: far beyond any run here on a busy machine, far below
# gloo's 30-minute collective timeout. Sleeping ranks sleep longer than this, so a launcher
# that waited for them instead of stopping them fails the test.
DEADLINE = 300
ASLEEP = str(3 * DEADLINE)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any process-group variables (the tests may run under SLURM)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def toy(*args: str, env: dict[str, str] | None = None, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.distributed.toy_cli", *args], cwd=ROOT,
                          env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


def start_toy(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.distributed.toy_cli", *args], cwd=ROOT,
                            env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # printed once, by rank 0 only
    return json.loads(lines[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Running and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for_pids(pid_dir: Path, n: int, proc: subprocess.Popen, timeout: float = DEADLINE) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(pid_dir.glob("*.pid"))
        if len(files) == n and all(f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("workers did not start")


def wait_gone(pids: list[int], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


# ---------------------------------------------------------------- environment detection (in-process)

def test_no_group_variables_means_no_group():
    assert detect_group({}) is None
    assert detect_group({"MASTER_ADDR": "node1", "MASTER_PORT": "1234"}) is None  # a common export
    assert detect_group({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}) is None


def test_torchrun_variables_are_read():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "2950"}
    assert detect_group(env) == GroupEnv(3, 8, 1, "n0", 2950, "torchrun")


def test_partial_torchrun_environment_names_the_missing_variables():
    with pytest.raises(DistributedError) as err:
        detect_group({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "n0"})
    message = str(err.value)
    assert "LOCAL_RANK" in message and "MASTER_PORT" in message
    assert "MASTER_ADDR," not in message.split(" not set")[0]  # present variables are not listed


def test_slurm_variables_are_read_with_master_from_the_node_list():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "12345"}
    group = detect_group(env)
    assert group == GroupEnv(5, 8, 1, "gpu07", 15000 + 12345 % 20000, "slurm")
    assert detect_group({**env, "MASTER_ADDR": "head", "MASTER_PORT": "4000"}).master_port == 4000


def test_partial_slurm_environment_names_the_missing_variables():
    with pytest.raises(DistributedError) as err:
        detect_group({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert "SLURM_LOCALID" in str(err.value) and "SLURM_NODELIST" in str(err.value)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("a1,b2", ["a1", "b2"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[9-11],login[1]", ["gpu9", "gpu10", "gpu11", "login1"]),
])
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


def test_one_process_runs_in_place(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    assert run_command(LaunchConfig(), lambda a, b: a + b, 2, b=3) == 5
    assert run_command(LaunchConfig(procs=1), lambda: os.getpid()) == os.getpid()


def test_bad_requests_are_usage_errors(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="not both"):
        run_command(LaunchConfig(gpus="2", procs=2), print)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            run_command(LaunchConfig(gpus="2"), print)
    with pytest.raises(UsageError, match="number or 'all'"):
        run_command(LaunchConfig(gpus="two"), print)


def test_relaunch_needs_a_known_command_line(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "_command", None)
    with pytest.raises(DistributedError, match="command line is unknown"):
        run_command(LaunchConfig(procs=2), print)


# ---------------------------------------------------------------- re-launch on 2 processes

@pytest.mark.slow
def test_two_processes_give_the_one_process_result_in_dataset_order():
    from tests.distributed.toy_cli import work

    single = work(7, None, "usage", 0.0, None)  # one process, no group: in this process
    double = result_of(toy("--total", "7", "--procs", "2"))
    assert (single["world"], single["initialized"]) == (1, False)
    assert (double["world"], double["initialized"]) == (2, True)
    expected = rows_for(np.arange(7))
    np.testing.assert_array_equal(np.array(single["values"]), expected)
    np.testing.assert_array_equal(np.array(double["values"]), expected)
    assert double["owners"] == [0, 0, 0, 0, 1, 1, 1]  # contiguous blocks, 7 = 4 + 3
    assert double["sizes"] == [4, 3]
    assert double["broadcast"] == "chosen by rank 0"


@pytest.mark.slow
def test_a_rank_that_raises_stops_everyone_fast_with_its_message():
    # Rank 1 fails at once while rank 0 waits for it inside the gather (a collective).
    proc = toy("--total", "7", "--procs", "2", "--fail-rank", "1")  # within DEADLINE: no 30-min wait
    assert proc.returncode == 2  # InputError's exit code, passed through from the worker
    assert "rank 1: rank-1 failed on purpose: bad file example.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.slow
def test_a_crashing_rank_stops_a_busy_one_and_shows_its_traceback(tmp_path):
    # Rank 0 hits a bug while rank 1 would still sleep past the deadline before its collective.
    proc = toy("--total", "7", "--procs", "2", "--fail-rank", "0", "--fail-kind", "bug",
               "--sleep", ASLEEP, "--pid-dir", str(tmp_path))
    assert proc.returncode == 1
    assert "rank 0: ValueError: a bug on rank 0" in proc.stderr
    assert "Traceback" in proc.stderr and "toy_cli.py" in proc.stderr
    assert wait_gone([int(p.read_text()) for p in tmp_path.glob("*.pid")])


def test_a_rank_aborted_by_the_runtime_is_named_with_where_it_died():
    # SIGABRT from C++ (std::terminate in a backend thread) leaves no Python error behind: the
    # worker's crash record must still say which step of the command was running.
    proc = toy("--total", "7", "--procs", "2", "--fail-rank", "1", "--fail-kind", "abort")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "rank 1 was killed by SIGABRT (in toy_cli.py:" in line and " in work)" in line, proc.stderr
    assert "Traceback" not in proc.stderr and "Fatal Python error" not in proc.stderr


def _stop_sleeping_run(tmp_path: Path, stop) -> tuple[subprocess.Popen, str, list[int]]:
    """Two ranks asleep past the deadline; ``stop(proc, pids)`` interrupts them from outside."""
    proc = start_toy("--total", "7", "--procs", "2", "--sleep", ASLEEP, "--pid-dir", str(tmp_path))
    try:
        pids = wait_for_pids(tmp_path, 2, proc)
        stop(proc, pids)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        proc.kill()
    return proc, err, pids


@pytest.mark.slow
def test_a_killed_worker_stops_the_command(tmp_path):
    proc, err, pids = _stop_sleeping_run(tmp_path, lambda proc, pids: os.kill(pids[1], signal.SIGKILL))
    assert proc.returncode == 1
    assert "rank 1 was killed by SIGKILL" in err
    assert wait_gone(pids)


@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path):
    proc, err, pids = _stop_sleeping_run(tmp_path, lambda proc, pids: proc.send_signal(signal.SIGINT))
    assert proc.returncode == 130
    assert "interrupted" in err
    assert wait_gone(pids)


# ---------------------------------------------------------------- joining torchrun / SLURM groups

@pytest.mark.slow
def test_torchrun_world_of_one_joins_instead_of_relaunching():
    env = clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))
    proc = toy("--total", "3", "--procs", "2", env=env)
    result = result_of(proc)
    assert (result["world"], result["initialized"]) == (1, True)
    assert "joining that group" in proc.stderr and "launching" not in proc.stderr


def _two_joined(envs: list[dict[str, str]], *args: str) -> list[subprocess.CompletedProcess]:
    procs = [start_toy(*args, env=e) for e in envs]
    try:
        outs = [p.communicate(timeout=DEADLINE) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.mark.slow
def test_torchrun_world_of_two_started_by_hand():
    port = str(free_port())
    envs = [clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port) for r in (0, 1)]
    rank0, rank1 = _two_joined(envs, "--total", "5")
    result = result_of(rank0)
    assert rank1.returncode == 0 and rank1.stdout.strip() == ""  # only rank 0 prints
    assert (result["world"], result["owners"]) == (2, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(np.array(result["values"]), rows_for(np.arange(5)))


@pytest.mark.slow
def test_slurm_tasks_join_one_group():
    port = str(free_port())
    envs = [clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NODELIST="localhost",
                      SLURM_JOB_ID="77", MASTER_PORT=port) for r in (0, 1)]
    rank0, rank1 = _two_joined(envs, "--total", "1")  # rank 1's share is empty
    result = result_of(rank0)
    assert rank1.returncode == 0 and rank1.stdout.strip() == ""
    assert (result["world"], result["local_rank"], result["sizes"]) == (2, 0, [1, 0])
    np.testing.assert_array_equal(np.array(result["values"]), rows_for(np.arange(1)))


@pytest.mark.slow
def test_partial_environment_is_an_error_before_any_work():
    proc = toy("--total", "3", env=clean_env(RANK="1", WORLD_SIZE="2"))
    assert proc.returncode == 1
    assert "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set" in proc.stderr


@pytest.mark.slow
def test_a_failing_rank_in_a_joined_group_stops_the_other_with_one_line_each():
    port = str(free_port())
    envs = [clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port) for r in (0, 1)]
    # Within DEADLINE: gloo notices the closed connection, no 30-minute collective timeout.
    rank0, rank1 = _two_joined(envs, "--total", "5", "--fail-rank", "1")
    assert rank1.returncode == 2 and "error: rank 1: rank-1 failed on purpose" in rank1.stderr
    assert rank0.returncode == 1 and "rank 0: lost contact with the other ranks" in rank0.stderr
    assert "Traceback" not in rank0.stderr + rank1.stderr


@pytest.mark.slow
def test_two_nodes_of_one_process_each_form_one_group():
    # Two launchers on this machine stand in for two nodes (static rendezvous at node 0).
    port = str(free_port())
    nodes = [start_toy("--total", "5", "--procs", "1", "--nnodes", "2", "--node-rank", str(n),
                       "--master-port", port) for n in (0, 1)]
    try:
        outs = [p.communicate(timeout=DEADLINE) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    (out0, err0), (out1, err1) = outs
    assert nodes[0].returncode == nodes[1].returncode == 0, err0 + err1
    result = json.loads(out0)
    assert (result["world"], result["owners"]) == (2, [0, 0, 0, 1, 1])
    assert out1.strip() == ""  # the global rank 0 prints, on node 0
    assert "node 1 of 2" in err1
