"""The worker process's server: what `cake worker` binds and how it names itself."""

from __future__ import annotations

import os
from pathlib import Path

from cake_py.config import WorkerSettings
from cake_py.rpc.worker import start_server


def test_port_zero_names_the_worker_by_the_port_it_got(tmp_path: Path) -> None:
    server, servicer, port = start_server(WorkerSettings(host="127.0.0.1", port=0, data_port=-1, cache_dir=tmp_path))
    try:
        assert port > 0
        assert servicer.name == f"{os.uname().nodename}:{port}"
    finally:
        server.stop(grace=None).wait()


def test_a_given_name_stays(tmp_path: Path) -> None:
    server, servicer, _ = start_server(
        WorkerSettings(name="box-1", host="127.0.0.1", port=0, data_port=-1, cache_dir=tmp_path)
    )
    try:
        assert servicer.name == "box-1"
    finally:
        server.stop(grace=None).wait()
