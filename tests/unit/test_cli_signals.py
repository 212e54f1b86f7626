"""Real `cake worker` and `cake serve` processes stopped by a signal: both stop cleanly, say so in one line on
stderr, and exit the same way, 130 on SIGINT (Ctrl-C) and 0 on SIGTERM (a stop asked for, done); a SIGINT while
they start ends them as Ctrl-C does, even where they were started with SIGINT ignored, and a SIGTERM then stops them
as it does while they serve."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.cluster import REPO_ROOT, CakeProcess, LocalCluster, child_env, first_connection

STOPS = [(signal.SIGINT, 130), (signal.SIGTERM, 0)]


def assert_stopped(process: CakeProcess, command: str, signum: signal.Signals, code: int) -> None:
    assert process.process is not None
    assert process.process.wait(timeout=30) == code, process.stderr[-4000:]
    stderr = process.stderr
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == f"cake {command}: stopped ({signum.name})", stderr[-4000:]
    assert sum("stopped" in line or "interrupted" in line for line in lines) == 1, stderr[-4000:]


@pytest.mark.parametrize(("signum", "code"), STOPS, ids=["SIGINT", "SIGTERM"])
def test_a_worker_stops_on_a_signal_says_so_and_exits_as_serve_does(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """Ctrl-C on `cake worker` exited 0 without a word, where `cake serve` said it was interrupted and exited 130."""
    with LocalCluster(tmp_path) as cluster:
        worker = cluster.worker()
        worker.start()
        worker.signal(signum)  # as soon as it says it listens: its handlers are in place by then
        assert_stopped(worker, "worker", signum, code)


@pytest.mark.parametrize(("signum", "code"), STOPS, ids=["SIGINT", "SIGTERM"])
def test_serve_stops_on_a_signal_says_so_and_exits_as_a_worker_does(
    tiny_llama: Path, tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """SIGTERM killed `cake serve` by the signal uvicorn raised again once it had stopped, where a worker exited 0;
    SIGINT came back as a KeyboardInterrupt, "interrupted" as if it had stopped while starting."""
    with LocalCluster(tmp_path) as cluster:
        master = cluster.serve(str(tiny_llama))
        master.signal(signum)
        assert_stopped(master, "serve", signum, code)


def _start_ignoring_sigint(*args: str) -> subprocess.Popen[str]:
    """`cake ARGS` started as bash starts a background job of a script (`( cake serve … & )`): SIGINT ignored."""
    command = [sys.executable, "-m", "cake_py.cli", *args]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
        env=child_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as bash does
    )


def _catches_sigint(pid: int) -> bool:
    """Whether the process has a handler for SIGINT (Linux's view of it: a bit of SigCgt)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def _assert_stopped_starting(cake: subprocess.Popen[str], command: str, signum: int) -> str:
    """`signum` now: the process ends at once, as a Ctrl-C (SIGINT: "cake: interrupted", 130) or a stop while
    serving (SIGTERM: "cake <command>: stopped (SIGTERM)", 0) does; its stdout."""
    said, code = ("cake: interrupted", 130) if signum == signal.SIGINT else (f"cake {command}: stopped (SIGTERM)", 0)
    cake.send_signal(signum)
    stopped = time.monotonic()
    out, err = cake.communicate(timeout=30)
    assert time.monotonic() - stopped < 5, err
    assert cake.returncode == code and "Traceback" not in err, (cake.returncode, err)
    assert err.splitlines()[-1] == said, err
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="reads the handlers from /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_worker_stops_on_a_signal_while_it_starts_as_it_does_serving(signum: int) -> None:
    """Started with SIGINT ignored, Python raises no KeyboardInterrupt: the worker ignored it until it served; and
    SIGTERM before it listened killed it by the signal's default: exit 143, not a word on stderr."""
    cake = _start_ignoring_sigint("worker", "--host", "127.0.0.1", "--port", "0", "--threads", "1")
    try:
        deadline = time.monotonic() + 30
        while not _catches_sigint(cake.pid):  # the CLI's startup handlers are in place: before torch is imported
            assert cake.poll() is None and time.monotonic() < deadline, "the worker never handled SIGINT"
            time.sleep(0.01)
        assert "listening on" not in _assert_stopped_starting(cake, "worker", signum)
    finally:
        if cake.poll() is None:
            cake.kill()
            cake.communicate()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_on_a_signal_while_it_handshakes_as_it_does_serving(tiny_llama: Path, signum: int) -> None:
    """Started with SIGINT ignored, `cake serve` waited out --connect-timeout of a worker that never answered; and
    `docker stop` during a long startup (SIGTERM while the master handshook with its workers) exited 143 with nothing
    on stderr, where a SIGTERM while serving exits 0."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: the handshake waits its deadline
    port = silent.getsockname()[1]
    args = ["serve", str(tiny_llama), "--workers", f"127.0.0.1:{port}", "--connect-timeout", "60", "--port", "0"]
    cake = _start_ignoring_sigint(*args, "--threads", "1")
    connected: socket.socket | None = None
    try:
        connected = first_connection(silent, cake)  # the master is handshaking now
        _assert_stopped_starting(cake, "serve", signum)
    finally:
        if cake.poll() is None:
            cake.kill()
            cake.communicate()
        if connected is not None:
            connected.close()
        silent.close()
