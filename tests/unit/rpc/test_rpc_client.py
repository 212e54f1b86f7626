"""The master's side of a worker (RemoteStage, WorkerConnection) against stand-ins: what it frees, when, and what
it says when something fails. Real worker processes are in tests/integration."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from cake_py.config import WorkerSpec
from cake_py.errors import ClusterError, WorkerSilentError
from cake_py.models.hub import resolve_model
from cake_py.models.kv_cache import SequenceSlice
from cake_py.rpc.client import RemoteStage
from cake_py.rpc.connection import VERIFY_BYTES_PER_S, Assignment, WorkerConnection
from cake_py.rpc.pb import worker_pb2 as pb


class FlakyConnection:
    """A WorkerConnection stand-in that is up, holds layers 0-2, and fails its first Release."""

    label = "worker 'w1' at 127.0.0.1:1"
    spec = WorkerSpec("w1", "127.0.0.1:1")
    data_port = 0

    def __init__(self) -> None:
        self.released: list[list[int]] = []
        self.release_failures = 1
        self.released_again = threading.Event()
        self.unassigned = False

    def info(self, timeout: float = 1.5) -> pb.InfoReply:
        return pb.InfoReply(
            status=pb.WORKER_STATUS_READY, layers=pb.LayerRange(start=0, end=2), model_id="m", forward_idle_seconds=1
        )

    def release(self, seq_ids: Sequence[int]) -> None:
        if self.release_failures:
            self.release_failures -= 1
            raise ClusterError(f"{self.label} is unreachable (releasing sequences): Deadline Exceeded")
        self.released.append(list(seq_ids))
        self.released_again.set()

    def unassign(self) -> None:
        self.unassigned = True

    def close(self) -> None:
        pass


@pytest.fixture
def stage() -> Iterator[tuple[RemoteStage, FlakyConnection]]:
    connection = FlakyConnection()
    assignment = Assignment("m", "{}", None, 0, 2, torch.float32)  # type: ignore[arg-type]
    remote = RemoteStage(connection, assignment)  # type: ignore[arg-type]
    yield remote, connection
    remote.close()


def test_a_release_that_fails_while_up_is_retried_at_the_next_ping(stage: tuple[RemoteStage, FlakyConnection]) -> None:
    remote, connection = stage
    remote.release([7, 8])  # the worker's link blips: this Release times out, the stage is still up
    assert connection.released_again.wait(5), "the sequences were never released: their KV caches leak"
    assert connection.released == [[7, 8]]


def test_the_first_reason_a_stage_went_down_is_kept(stage: tuple[RemoteStage, FlakyConnection]) -> None:
    remote, _ = stage
    remote._mark_down("unreachable (reporting its status): Deadline Exceeded")
    remote._mark_down("Locally cancelled by application!")  # the engine thread, seeing its stream cancelled
    assert remote._status_error == "unreachable (reporting its status): Deadline Exceeded"
    assert not remote.healthy()


class SilentConnection(FlakyConnection):
    """A worker whose connection stays open but whose pings go unanswered while `silent` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.silent = threading.Event()
        self.timeouts: list[float] = []

    def info(self, timeout: float = 1.5) -> pb.InfoReply:
        if self.silent.is_set():
            self.timeouts.append(timeout)
            time.sleep(min(timeout, 0.05))
            raise WorkerSilentError(f"{self.label} is unreachable (reporting its status): Deadline Exceeded")
        return super().info(timeout)


def test_a_worker_is_down_only_once_silent_for_a_while_and_then_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single ping unanswered within its 1.5 s turned the stage down, failing every request in flight."""
    from cake_py.rpc import client

    monkeypatch.setattr(client, "PING_INTERVAL_S", 0.05)
    monkeypatch.setattr(client, "SILENT_DOWN_S", 1.5)
    connection = SilentConnection()
    assignment = Assignment("m", "{}", None, 0, 2, torch.float32)  # type: ignore[arg-type]
    remote = RemoteStage(connection, assignment)  # type: ignore[arg-type]
    try:
        time.sleep(0.2)
        connection.silent.set()
        began = time.monotonic()
        time.sleep(0.5)
        assert remote.healthy() and len(connection.timeouts) >= 2, connection.timeouts  # late pings: a stall
        assert remote.answers() is False and remote.healthy()  # a switch waits for it; nothing in flight fails
        connection.silent.clear()
        deadline = time.monotonic() + 5
        while remote._late and time.monotonic() < deadline:
            time.sleep(0.02)
        assert remote.healthy() and not remote._late  # it answered again: nothing happened

        connection.silent.set()
        began = time.monotonic()
        while remote.healthy() and time.monotonic() - began < 10:
            time.sleep(0.02)
        assert not remote.healthy()
        assert time.monotonic() - began >= 1.0  # silent for SILENT_DOWN_S (less the last ping's age), not at once
        assert "answered nothing for" in remote.status_error and "paused" in remote.status_error
        assert max(connection.timeouts) <= 1.5  # every ping within its timeout, the last cut to end the silence
    finally:
        connection.silent.clear()
        remote.close()


def test_a_closed_connection_is_down_at_once(stage: tuple[RemoteStage, FlakyConnection]) -> None:
    remote, connection = stage

    def refused(timeout: float = 1.5) -> pb.InfoReply:
        raise ClusterError(f"{connection.label} is unreachable (reporting its status): Connection refused")

    connection.info = refused  # type: ignore[method-assign]
    assert remote.answers() is False and not remote.healthy()


GIB = 1 << 30


class PingedConnection:
    """A WorkerConnection stand-in for a worker up with layers 0-2 whose free memory fell from 6 GiB at the
    handshake to 2 GiB by its pings; once the worker is gone, it answers no handshake."""

    label = "worker 'w1' at 127.0.0.1:1"
    spec = WorkerSpec("w1", "127.0.0.1:1")
    data_port = 0
    host = pb.HostInfo(hostname="box", device="cpu", memory_total_bytes=8 * GIB, memory_free_bytes=6 * GIB)

    def info(self, timeout: float = 1.5) -> pb.InfoReply:
        host = pb.HostInfo()
        host.CopyFrom(self.host)
        host.memory_free_bytes = 2 * GIB
        return pb.InfoReply(
            status=pb.WORKER_STATUS_READY,
            host=host,
            layers=pb.LayerRange(start=0, end=2),
            model_id="m",
            kv_cache_bytes=4096,
            weights_bytes=1024,
            live_sequences=3,
            cpu_percent=55.0,
            process_rss_bytes=GIB,
        )

    def handshake(self, timeout: float = 1.5) -> pb.HandshakeReply:
        raise ClusterError(f"{self.label} is unreachable (handshake): Connection refused")

    def unassign(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_worker_figures_come_from_its_last_ping_and_are_unknown_once_it_is_down() -> None:
    assignment = Assignment("m", "{}", None, 0, 2, torch.float32)  # type: ignore[arg-type]
    remote = RemoteStage(PingedConnection(), assignment)  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 5
        while remote.describe().get("live_sequences") is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the monitor pings every second
        node = remote.describe()
        # Free and used memory from one ping, not free from the handshake and used from the ping.
        assert node["vram_bytes"] == 8 * GIB
        assert node["memory_free_bytes"] == 2 * GIB and node["memory_used_bytes"] == 6 * GIB
        assert (node["kv_cache_bytes"], node["live_sequences"], node["cpu_percent"]) == (4096, 3, 55.0)

        remote._mark_down("unreachable (reporting its status): Deadline Exceeded")
        down = remote.describe()
        assert down["status"] == "down"
        # What the last ping said of its caches, sequences, load and memory no longer holds: unknown, not stale.
        for figure in ("kv_cache_bytes", "live_sequences", "cpu_percent", "memory_free_bytes", "memory_used_bytes"):
            assert down[figure] is None, figure
        assert (down["hostname"], down["vram_bytes"]) == ("box", 8 * GIB)  # what it is stays known
    finally:
        remote.close()


class MissedDeadline:
    """A call's future that ends with its deadline missed."""

    def result(self, timeout: float | None = None) -> Any:
        error = grpc.RpcError()
        error.code = lambda: grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        error.details = lambda: "Deadline Exceeded"  # type: ignore[attr-defined]
        raise error


class TimeoutPrepare:
    def __init__(self, timeouts: list[float]) -> None:
        self.timeouts = timeouts

    def future(self, request: Any, timeout: float, metadata: Any) -> MissedDeadline:
        self.timeouts.append(timeout)
        return MissedDeadline()


class TimeoutStub:
    """A worker stub whose Prepare records its deadline and then misses it."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []
        self.Prepare = TimeoutPrepare(self.timeouts)


def test_verifying_a_large_cache_gets_time_and_says_what_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    connection = WorkerConnection(WorkerSpec("w1", "127.0.0.1:1"), None, None)
    stub = TimeoutStub()
    monkeypatch.setattr(connection, "_open", lambda: stub)
    size = 40 * 10**9  # a 40 GB stage: hashing it on a slow disk takes minutes
    spec = pb.TensorSpec(name="model.layers.0.w", dtype=pb.DTYPE_BFLOAT16, shape=[1], sha256="0" * 64, size_bytes=size)
    monkeypatch.setattr(connection, "manifest", lambda assignment: [spec])
    with pytest.raises(ClusterError, match="verifying its weight cache for layers 0-9"):
        connection.assign(Assignment("m", "{}", None, 0, 10, torch.bfloat16))  # type: ignore[arg-type]
    assert stub.timeouts == [size / VERIFY_BYTES_PER_S]


class _SlowCall:
    """A gRPC future that is not done until told; records a cancel."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.cancelled = False

    def result(self, timeout: float) -> str:
        if self.done.wait(timeout):
            return "loaded"
        raise grpc.FutureTimeoutError()

    def cancel(self) -> None:
        self.cancelled = True


class _Unanswered(grpc.RpcError):
    pass


def test_a_stream_the_worker_keeps_reading_is_not_given_up_though_its_pings_go_unanswered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A link kept full by the weight stream may delay every ping past its timeout: the worker taking chunks is
    alive, and the Assign went on being cancelled after ASSIGN_STALL_S all the same."""
    from cake_py.rpc import connection

    monkeypatch.setattr(connection, "PING_INTERVAL_S", 0.01)
    # 20 times the reader's 50 ms between chunks: 0.3 s was a pause a loaded machine could give that thread
    monkeypatch.setattr(connection, "ASSIGN_STALL_S", 1.0)

    class Stub:
        def Info(self, *args: object, **kwargs: object) -> None:
            raise _Unanswered()

    class Channel:
        def close(self) -> None:
            pass

    link = WorkerConnection(WorkerSpec("w", "127.0.0.1:1"), None, None)
    monkeypatch.setattr(link, "_watchdog", lambda: (Channel(), Stub()))
    call, progress = _SlowCall(), [time.monotonic()]

    def reading() -> None:  # the worker takes a chunk every 50 ms for 2 s (past ASSIGN_STALL_S), then the stream ends
        for _ in range(40):
            time.sleep(0.05)
            progress[0] = time.monotonic()
        call.done.set()

    threading.Thread(target=reading, daemon=True).start()
    assert link._await(call, "loading layers 0-1", progress) == "loaded" and not call.cancelled
    stalled = _SlowCall()
    with pytest.raises(ClusterError, match="stopped answering while loading layers 0-1"):
        link._await(stalled, "loading layers 0-1", [time.monotonic()])  # nothing read, no ping answered
    assert stalled.cancelled


def test_a_pending_release_never_frees_a_sequence_computed_again_under_its_id(
    stage: tuple[RemoteStage, FlakyConnection],
) -> None:
    """A Release that failed is sent again at the next ping; a sequence the engine computes again from its first
    token meanwhile (preempted for memory, restarted after a failover) has new caches there by then."""
    remote, connection = stage
    connection.release_failures = 10**6  # every Release fails: what is pending stays visible
    remote.release([5, 8, 9])
    remote.starting_over([SequenceSlice(5, 0, 4), SequenceSlice(8, 12, 1), SequenceSlice(9, 3, 1, copy_from=2)])
    assert remote._unreleased == {8}  # noqa: SLF001  # 8 goes on from position 12: its old caches are still to go


@pytest.fixture
def port_that(request: pytest.FixtureRequest) -> Iterator[str]:
    """127.0.0.1:PORT where nothing listens ("refused"), a process that accepts connections and says nothing
    ("silent": a paused worker), or one that closes each at once ("closes": a TLS worker, to a plaintext master)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    stop = threading.Event()
    if request.param == "refused":
        listener.close()
    else:
        listener.listen(16)  # the kernel completes the connections: a SIGSTOPped worker's port does the same
        if request.param == "closes":
            listener.settimeout(0.1)

            def close_each() -> None:
                while not stop.is_set():
                    try:
                        listener.accept()[0].close()
                    except OSError:
                        continue

            threading.Thread(target=close_each, daemon=True).start()
    yield address
    stop.set()
    listener.close()


@pytest.mark.parametrize(
    ("port_that", "said"),
    [
        ("refused", "is unreachable (handshaking): nothing listens there (connection refused)"),
        ("silent", "it accepted the connection but answered nothing within 0.5 s (is it paused or overloaded"),
        ("closes", "is `cake worker` running there, without TLS? (a TLS worker needs --tls-ca on the master)"),
    ],
    indirect=["port_that"],
)
def test_a_first_handshake_that_fails_says_what_happened(
    port_that: str, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port with nothing listening, a frozen worker and a TLS worker all read "Deadline Exceeded; is `cake worker`
    running there, without TLS?": the hint blamed TLS for a worker that was paused or not started."""
    from cake_py.rpc import first_contact

    monkeypatch.setattr(first_contact, "KNOCK_TIMEOUT_S", 0.5)
    link = WorkerConnection(WorkerSpec("w1", port_that), None, None)
    try:
        with pytest.raises(ClusterError) as caught:
            link.handshake(timeout=0.5)
    finally:
        link.close()
    message = str(caught.value)
    assert message.startswith(f"worker 'w1' at {port_that} is unreachable (handshaking)"), message
    assert said in message, message
    if "TLS" not in said:
        assert "TLS" not in message, message


class _Answered:
    def __init__(self, reply: Any) -> None:
        self.reply = reply

    def result(self, timeout: float | None = None) -> Any:
        return self.reply


def test_layers_the_worker_has_cached_are_not_loaded_again_for_its_assign(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Path
) -> None:
    """Every layer was loaded again to skip the cached ones' tensors: a stream that sent nothing meanwhile, which a
    worker gives up after --assign-idle-seconds (a failover growing a range of a large model by a few layers)."""
    source = resolve_model(str(tiny_llama))
    assignment = Assignment(source.model_id, "{}", source.weights, 0, 3, torch.float32)
    connection = WorkerConnection(WorkerSpec("w1", "127.0.0.1:1"), None, None)
    specs = connection.manifest(assignment)
    missing = [spec.sha256 for spec in specs if spec.name.startswith("model.layers.1.")]
    loaded: list[str] = []
    load = source.weights.load

    def counted(names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        loaded.extend(names)
        return load(names, dtype)

    monkeypatch.setattr(source.weights, "load", counted)
    sent: list[pb.AssignChunk] = []

    class Stub:
        class Prepare:
            @staticmethod
            def future(request: Any, timeout: float, metadata: Any) -> _Answered:
                return _Answered(pb.PrepareReply(missing_sha256=missing))

        class Assign:
            @staticmethod
            def future(chunks: Iterator[pb.AssignChunk], timeout: float, metadata: Any) -> _Answered:
                sent.extend(chunks)
                return _Answered(pb.AssignReply(assignment=7))

    monkeypatch.setattr(connection, "_open", lambda: Stub)
    assert connection.assign(assignment).assignment == 7
    assert loaded and {name.split(".")[2] for name in loaded} == {"1"}  # layers 0 and 2 are in the worker's cache
    streamed = {chunk.chunk.name for chunk in sent if chunk.WhichOneof("payload") == "chunk"}
    assert streamed == {spec.name for spec in specs if spec.sha256 in missing}


class IdleConnection(FlakyConnection):
    """Answers its pings, and says it has worked on no forward for `idle` seconds."""

    def __init__(self, idle: float) -> None:
        super().__init__()
        self.idle = idle

    def info(self, timeout: float = 1.5) -> pb.InfoReply:
        return pb.InfoReply(
            status=pb.WORKER_STATUS_READY,
            layers=pb.LayerRange(start=0, end=2),
            model_id="m",
            forward_idle_seconds=self.idle,
        )


@pytest.mark.parametrize(("idle", "lost"), [(60.0, True), (0.0, False)])
def test_a_forward_the_worker_dropped_turns_the_stage_down(
    monkeypatch: pytest.MonkeyPatch, idle: float, lost: bool
) -> None:
    """A forward a worker dropped while it went on answering its pings was waited for for ever (no timeout on the
    stream's read or the fast path's socket): the engine thread hung. One it works on (a long prefill) is not lost."""
    from cake_py.rpc import client

    monkeypatch.setattr(client, "FORWARD_LOST_S", 0.3)
    connection = IdleConnection(idle)
    remote = RemoteStage(connection, Assignment("m", "{}", None, 0, 2, torch.float32))  # type: ignore[arg-type]
    try:
        remote._sent_at = time.monotonic()  # noqa: SLF001  # what forward() sets while it waits for the answer
        deadline = time.monotonic() + (5 if lost else 2)  # pings come every second
        while remote.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if lost:
            assert not remote.healthy()
            assert "got no answer, and the worker has worked on none since" in remote._status_error  # noqa: SLF001
        else:
            assert remote.healthy()
    finally:
        remote.close()
