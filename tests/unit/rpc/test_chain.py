"""Chained forwards of pipelined pieces (cake_py.rpc.chain) over real TLS loopback connections: the first worker's
connection is written by the sender thread and must not be read meanwhile (one OpenSSL connection is not safe to
read and write from two threads at once)."""

from __future__ import annotations

import itertools
import math
import queue
import select
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cake_py.cluster.stage import StageStats
from cake_py.errors import StageError
from cake_py.models.kv_cache import Batch, SequenceSlice
from cake_py.rpc import chain
from cake_py.rpc.chain import forward_chain_pieces
from cake_py.rpc.codec import decode_tensor, encode_tensor
from cake_py.rpc.dataplane import DataPlaneServer, server_tls
from cake_py.rpc.dataplane_client import DataPlaneClient, client_tls
from cake_py.rpc.pb import worker_pb2 as pb
from tests.fixtures.tls import make_certificates

WAIT_S = 10.0  # a bound on each wait below, so that a broken chain fails the test instead of hanging it


@dataclass
class _Stage:
    """What forward_chain_pieces uses of a RemoteStage: its fast-path connection and its figures."""

    name: str
    _fast: DataPlaneClient
    connection: Any = field(init=False)
    stats: StageStats = field(default_factory=StageStats)
    chained_calls: int = 0
    _up: bool = True
    _chain_off: bool = False
    _info_at: float = math.inf  # answered a ping after any forward: idle, so a lost answer stalls the chain
    _worked_at: float = 0.0

    def __post_init__(self) -> None:
        self.connection = SimpleNamespace(assignment=1, label=f"worker {self.name!r}")

    def _broken(self, error: BaseException) -> StageError:
        return StageError(f"{self.name}: {error}")


@dataclass
class _Watch:
    """Reads of the master's connection to the first worker, each noted with whether the sender thread was alive."""

    sender: list[threading.Thread] = field(default_factory=list)  # the thread calling `lead`
    reads_while_sending: list[int] = field(default_factory=list)
    reads_after: list[int] = field(default_factory=list)
    read: threading.Event = field(default_factory=threading.Event)  # set at the first read once the sender runs
    progress: threading.Condition = field(default_factory=threading.Condition)  # notified at each read

    def reading(self, size: int) -> None:
        if self.sender:  # (the hello's answer was read before)
            (self.reads_while_sending if self.sender[0].is_alive() else self.reads_after).append(size)
            with self.progress:
                self.read.set()
                self.progress.notify_all()

    def socket_class(self) -> type[ssl.SSLSocket]:
        """A TLS socket class for the master's end (SSLContext.sslsocket_class) that notes each read."""
        watch = self

        class Watched(ssl.SSLSocket):
            def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
                watch.reading(buflen)
                return super().recv(buflen, flags)

            def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
                watch.reading(nbytes or len(buffer))
                return super().recv_into(buffer, nbytes, flags)

        return Watched


@dataclass
class _Chain:
    first: DataPlaneServer
    last: DataPlaneServer
    clients: list[DataPlaneClient]
    requests: queue.Queue[pb.ForwardRequest]  # what the first worker received, in order
    watch: _Watch


@pytest.fixture
def tls_chain(tmp_path: Path) -> Iterator[_Chain]:
    """Two TLS fast-path servers and the master's connections to them. The first answers its first request with a
    stale reply (an answer to an earlier step, which the master skips) on the master's connection; the test answers
    for the last worker on the master's connection to it."""
    certificates = make_certificates(tmp_path)
    requests: queue.Queue[pb.ForwardRequest] = queue.Queue()
    received = itertools.count(1)

    def first_worker(frame: bytes) -> bytes | None:
        requests.put(pb.ForwardRequest.FromString(frame))
        return pb.ForwardReply(request_id=0).SerializeToString() if next(received) == 1 else None

    servers = [
        DataPlaneServer(
            "127.0.0.1", 0, handler, None, server_tls(certificates.server_cert, certificates.server_key, None)
        )
        for handler in (first_worker, lambda frame: None)
    ]
    watch = _Watch()
    contexts = [client_tls(None, None, certificates.ca) for _ in servers]
    assert contexts[0] is not None
    contexts[0].sslsocket_class = watch.socket_class()
    clients = [
        DataPlaneClient("127.0.0.1", server.port, None, context)
        for server, context in zip(servers, contexts, strict=True)
    ]
    try:
        for server in servers:
            server.start()
        for client in clients:
            client.connect(timeout=WAIT_S)
        yield _Chain(servers[0], servers[1], clients, requests, watch)
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.close()


def _answer(chain: _Chain, request: pb.ForwardRequest) -> None:
    """The last worker's answer to a piece: its hidden states plus 100."""
    reply = pb.ForwardReply(request_id=request.request_id)
    encode_tensor(decode_tensor(request.hidden) + 100, out=reply.hidden)
    assert chain.last.send_to_session(chain.clients[1].session, reply.SerializeToString())


def _arrived(client: DataPlaneClient, watch: _Watch) -> bool:
    """Whether bytes came on the master's end of `client`'s connection: waiting there (poll on its descriptor reads
    nothing), or read already."""
    assert client.sock is not None
    poller = select.poll()
    poller.register(client.sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:  # each round waits in poll: it ends when the bytes come
        if watch.read.is_set() or poller.poll(50):
            return True
    return False


def test_the_first_workers_tls_connection_is_not_read_while_the_pieces_are_sent(
    tls_chain: _Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer waits on the first worker's connection while the sender thread still has a piece to send (it is
    held before its third until the reader has taken the second's answer). The reader takes the last worker's
    answers meanwhile and reads the first worker's connection only once the sender is done.

    No race decides it: the stale reply is on the first connection before the last worker's first answer comes, so
    a reader that polled that connection would see it with that answer, read it before the second answer comes,
    and so while the sender still waits to send the third piece."""
    monkeypatch.setattr(chain, "CHAIN_STALL_S", WAIT_S)  # a lost answer fails the step soon (the stages look idle)
    watch = tls_chain.watch
    pieces: list[tuple[torch.Tensor, Batch]] = [
        (torch.full((2, 4), float(index)), [SequenceSlice(1, 2 * index, 2)]) for index in range(3)
    ]
    taken: list[torch.Tensor] = []  # the answers `trail` ran on, in order
    far_end_failed: list[BaseException] = []

    def lead(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        watch.sender[:] = [threading.current_thread()]
        if hidden[0, 0] == 2:  # the third piece: the sender stays alive until the reader has taken the second's
            with watch.progress:  # answer, or read the first worker's connection
                assert watch.progress.wait_for(lambda: len(taken) == 2 or watch.read.is_set(), WAIT_S)
        return hidden

    def trail(output: torch.Tensor, batch: Batch) -> torch.Tensor:
        with watch.progress:
            taken.append(output)
            watch.progress.notify_all()
        return output

    def far_end() -> None:
        """The rest of the chain: the stale reply waits on the master's first connection before any answer of the
        last worker comes, and each answer after the reader took the one before."""
        try:
            first, second = (tls_chain.requests.get(timeout=WAIT_S) for _ in range(2))
            assert _arrived(tls_chain.clients[0], watch)
            _answer(tls_chain, first)
            with watch.progress:
                assert watch.progress.wait_for(lambda: len(taken) == 1, WAIT_S)
            _answer(tls_chain, second)
            third = tls_chain.requests.get(timeout=WAIT_S)
            watch.read.wait(WAIT_S)  # the stale reply read before the last answer comes (or never: asserted below)
            _answer(tls_chain, third)
        except BaseException as error:
            far_end_failed.append(error)

    helper = threading.Thread(target=far_end, daemon=True)
    helper.start()
    stages: list[Any] = [_Stage("first", tls_chain.clients[0]), _Stage("last", tls_chain.clients[1])]
    outputs = forward_chain_pieces(stages, pieces, lead, trail)
    helper.join(WAIT_S)
    assert not far_end_failed
    assert outputs is not None
    assert [output.tolist() for output in outputs] == [(hidden + 100).tolist() for hidden, _ in pieces]
    assert watch.reads_while_sending == [], "the first worker's connection was read while the sender thread ran"
    assert watch.reads_after  # read again once the sender was done (the stale reply, skipped)
