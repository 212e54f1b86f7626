"""The master's handling of its workers' handshakes, against stand-ins (real workers are in tests/integration)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

from cake_py.cluster.master import (
    DOWN_FACTS,
    _adopt_worker_names,
    _warn_of_takeovers,
    micro_batch_tokens,
    probe_workers,
)
from cake_py.cluster.names import WorkerNames
from cake_py.cluster.pipeline import MICRO_BATCH_TOKENS
from cake_py.config import ServeSettings, parse_workers_flag
from cake_py.rpc import PROTOCOL_VERSION
from cake_py.rpc import connection as connection_module
from cake_py.rpc.connection import WorkerConnection
from cake_py.rpc.pb import worker_pb2 as pb
from tests.fixtures.cluster import free_port


def _handshakes(*reported: str) -> tuple[list[Any], list[Any]]:
    """Connections as --workers gives them (worker-1, worker-2, … unnamed) and replies reporting `reported`."""
    specs = parse_workers_flag(",".join(f"127.0.0.1:{10128 + i}" for i in range(len(reported))))
    names = WorkerNames()
    connections = [SimpleNamespace(spec=spec, configured=spec, names=names) for spec in specs]
    replies = [SimpleNamespace(host=SimpleNamespace(worker_name=name)) for name in reported]
    return connections, replies


def test_workers_given_by_address_are_shown_under_the_names_they_report() -> None:
    connections, replies = _handshakes("gpu-a", "gpu-b")
    _adopt_worker_names(connections, replies)
    assert [conn.spec.name for conn in connections] == ["gpu-a", "gpu-b"]


def test_a_worker_that_calls_itself_master_keeps_its_address_name() -> None:
    # "master" is the name of the master's own stages: a worker under it would be mixed up with them.
    connections, replies = _handshakes("gpu-a", "master")
    _adopt_worker_names(connections, replies)
    assert [conn.spec.name for conn in connections] == ["worker-1", "worker-2"]


def test_the_masters_own_part_and_the_layers_add_up_to_the_whole_model(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cake_py.cluster.master import ends_bytes, layer_bytes
    from cake_py.cluster.pipeline import load_ends
    from cake_py.models.hub import resolve_model

    source = resolve_model(str(tiny_model_factory("llama")))  # untied head: embedding and lm_head both count
    ends = load_ends(source, torch.float32)
    assert ends_bytes(source, torch.float32) == sum(p.nbytes for p in ends.parameters())
    assert ends_bytes(source, torch.bfloat16) * 2 == ends_bytes(source, torch.float32)
    total = sum(t.numel() * 4 for t in source.weights.load(source.weights.names(), torch.float32).values())
    assert sum(layer_bytes(source, torch.float32)) + ends_bytes(source, torch.float32) == total


def test_a_ggufs_4bit_weights_count_as_kept_where_their_kernels_run() -> None:
    """The master alone refuses a model its memory cannot hold: a Q4_1 GGUF counted as dense bf16 (2.8× its real
    size here) would refuse models that fit. Where the int4 kernels do not run (float32, a GPU) it is dense."""
    import torch

    from cake_py.cluster.master import model_bytes
    from cake_py.cluster.pipeline import local_pipeline
    from cake_py.models.hub import resolve_model

    source = resolve_model(None)  # the embedded SmolLM2 Q4_1
    pipeline = local_pipeline(source, torch.bfloat16)
    modules = [pipeline.ends, *(stage.model for stage in pipeline.stages)]  # type: ignore[attr-defined]
    built = sum(t.nbytes for module in modules for t in [*module.parameters(), *module.buffers()])
    assert model_bytes(source, torch.bfloat16, "cpu") == built
    dense = sum(math.prod(source.weights.info(name).shape) for name in source.weights.names()) * 2
    assert model_bytes(source, torch.bfloat16, "cuda") == dense
    assert model_bytes(source, torch.float32, "cpu") == dense * 2


def test_taking_over_a_worker_another_master_used_lately_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """A second master took a busy worker without a word; the first one's requests then failed."""

    def connection(label: str, idle: float) -> Any:
        return SimpleNamespace(label=label, info=lambda: SimpleNamespace(forward_idle_seconds=idle))

    def reply(assignment: int) -> Any:
        return SimpleNamespace(assignment=assignment, model_id="tiny", layers=SimpleNamespace(start=0, end=3))

    connections = [connection("worker 'busy'", 1.0), connection("worker 'idle'", 600.0), connection("worker 'new'", 0)]
    _warn_of_takeovers(connections, [reply(7), reply(9), reply(0)])
    said = "worker 'busy' was serving another master 1 s ago (tiny layers 0-2): this master takes it over"
    assert said in caplog.text
    assert "'idle'" not in caplog.text and "'new'" not in caplog.text


def test_ctrl_c_while_a_worker_says_nothing_ends_cake_serve_at_once(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """The handshakes' thread pool waited for its calls on the way out: Ctrl-C waited out --connect-timeout (and
    during a weight stream, the whole stream)."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.fixtures.cluster import first_connection

    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: the handshake waits its deadline
    silent.listen(8)
    port = silent.getsockname()[1]
    main = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    main += "from cake_py.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", main, "serve", str(tiny_llama), "--workers", f"127.0.0.1:{port}"]
    command += ["--connect-timeout", "60", "--port", "0", "--threads", "1", "--log-level", "info"]
    cake = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    connected: socket.socket | None = None
    try:
        connected = first_connection(silent, cake)  # the master is handshaking now
        time.sleep(0.5)
        cake.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, err = cake.communicate(timeout=30)
        assert time.monotonic() - interrupted < 5, "Ctrl-C waited for the handshake's deadline"
        assert cake.returncode == 130 and "Traceback" not in err, err
        assert "cake: interrupted" in err
    finally:
        if cake.poll() is None:
            cake.kill()
            cake.wait()
        if connected is not None:
            connected.close()
        silent.close()


def _host(name: str, device: str = "cpu", threads: int = 1, cpus: int = 2) -> Any:
    """A handshake's HostInfo as far as the pool and the cores go."""
    memory_id = "ram" if device == "cpu" else f"cuda-{device}"
    return SimpleNamespace(hostname=name, memory_id=memory_id, device=device, threads=threads, cpu_count=cpus)


@pytest.mark.parametrize(
    ("asked", "hosts", "expected"),
    [
        (None, [_host("a"), _host("b")], MICRO_BATCH_TOKENS),  # two hosts: each worker computes on its own
        (None, [_host("box", "GPU-1"), _host("box", "GPU-2")], MICRO_BATCH_TOKENS),  # two GPUs of one host
        (None, [_host("box"), _host("box")], MICRO_BATCH_TOKENS),  # a thread each on a 2-core host
        (None, [_host("box", threads=2), _host("box", threads=1)], 0),  # 3 threads on 2 cores: they take turns
        (None, [_host("box", "GPU-1"), _host("box", "GPU-1")], 0),  # one GPU: they take turns
        (None, [_host("a")], MICRO_BATCH_TOKENS),  # one worker: the pipeline runs its steps whole anyway
        (64, [_host("box", threads=4), _host("box", threads=4)], 64),  # asked: as asked
        (0, [_host("a"), _host("b")], 0),
    ],
)
def test_steps_are_cut_where_workers_compute_at_once(asked: int | None, hosts: list[Any], expected: int) -> None:
    assert micro_batch_tokens(asked, hosts) == expected


def _probed(monkeypatch: pytest.MonkeyPatch, settings: ServeSettings, reported: str) -> list[dict[str, Any]]:
    """probe_workers over `settings.workers`, each answering its handshake as a worker named `reported`."""

    def handshake(self: WorkerConnection, timeout: float = 1.0, *, diagnose: bool = True) -> pb.HandshakeReply:
        return pb.HandshakeReply(protocol_version=PROTOCOL_VERSION, host=pb.HostInfo(worker_name=reported))

    monkeypatch.setattr(WorkerConnection, "handshake", handshake)
    return probe_workers(settings, 1.0)


def test_probed_workers_are_shown_under_the_names_the_master_shows_them_under(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A probe (no model served) named each worker by the --name it reported, bypassing the master's rules: two
    workers started with one --name were both shown under it, and the dashboard drew one card for the two."""
    specs = parse_workers_flag("127.0.0.1:10128,127.0.0.1:10129")
    settings = ServeSettings(workers=specs)
    names = [node["name"] for node in _probed(monkeypatch, settings, "same")]
    assert names == [spec.name for spec in specs] and len(set(names)) == 2
    settings.worker_names.adopt(specs[0], "gpu-a")  # as a placement adopts a name no other worker has
    assert [node["name"] for node in _probed(monkeypatch, settings, "same")] == ["gpu-a", specs[1].name]


def test_a_probe_of_a_worker_that_is_not_there_is_quick_and_lists_its_fields_as_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each probe of a worker that did not answer also knocked on its port to say why (up to 2 s more), at every
    1-second poll of the dashboard with no model served; and it lacked the fields a topology node has."""
    knocked: list[str] = []
    monkeypatch.setattr(connection_module, "knock", lambda address: knocked.append(address) or "refused")
    settings = ServeSettings(workers=parse_workers_flag(f"127.0.0.1:{free_port()}"))
    [down] = probe_workers(settings, 0.5)
    assert (down["status"], knocked) == ("down", [])
    assert {key: down[key] for key in DOWN_FACTS} == DOWN_FACTS
