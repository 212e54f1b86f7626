"""Real `cake worker` and `cake serve` processes stopped by a signal: both stop cleanly, say so in one line on
stderr, and exit the same way, 130 on SIGINT (Ctrl-C) and 0 on SIGTERM (a stop asked for, done)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.fixtures.cluster import CakeProcess, LocalCluster

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
