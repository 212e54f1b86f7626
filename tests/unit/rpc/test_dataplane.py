"""The forward fast path's framing, hello and cluster-key check, on real loopback sockets."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cake_py.errors import ClusterError
from cake_py.rpc import dataplane
from cake_py.rpc.dataplane import MAX_HELLO_BYTES, DataPlaneServer, read_frame, server_tls, write_frame
from cake_py.rpc.dataplane_client import DataPlaneClient, client_tls
from tests.fixtures.tls import make_certificates


def test_frames_round_trip_over_a_socket_pair() -> None:
    left, right = socket.socketpair()
    payloads = [b"", b"x", bytes(range(256)) * 5000]  # the last is larger than a socket buffer
    with left, right:
        writer = threading.Thread(target=lambda: [write_frame(left, p) for p in payloads])
        writer.start()
        assert [read_frame(right) for _ in payloads] == payloads
        writer.join(timeout=5)


def test_an_oversized_frame_is_refused_without_reading_it() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack("<I", 0xFFFFFFFF))
        with pytest.raises(ConnectionError, match="over the"):
            read_frame(right)


@pytest.fixture
def echo_server() -> Iterator[DataPlaneServer]:
    ended = threading.Event()
    server = DataPlaneServer("127.0.0.1", 0, lambda data: data[::-1], "secret", None, on_connection_end=ended.set)
    server.start()
    yield server
    server.close()


def test_client_exchanges_frames_with_the_key(echo_server: DataPlaneServer) -> None:
    client = DataPlaneClient("127.0.0.1", echo_server.port, "secret", None)
    client.connect(timeout=5)
    assert client.exchange(b"abc") == b"cba"
    assert client.exchange(b"") == b""
    client.close()
    with pytest.raises(ConnectionError):
        client.exchange(b"after close")


@pytest.mark.parametrize("key", [None, "wrong"])
def test_a_wrong_or_missing_key_is_refused(echo_server: DataPlaneServer, key: str | None) -> None:
    with pytest.raises(ClusterError, match="cluster key rejected"):
        DataPlaneClient("127.0.0.1", echo_server.port, key, None).connect(timeout=5)


def test_closing_unblocks_a_waiting_exchange() -> None:
    slow = threading.Event()
    server = DataPlaneServer("127.0.0.1", 0, lambda data: (slow.wait(10), data)[1], None, None)
    server.start()
    client = DataPlaneClient("127.0.0.1", server.port, None, None)
    client.connect(timeout=5)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.exchange(b"hang")
        except (OSError, ConnectionError) as error:
            errors.append(error)

    waiter = threading.Thread(target=call)
    waiter.start()
    threading.Event().wait(0.2)
    client.close()  # what the stage's health monitor does when the worker stops answering
    waiter.join(timeout=5)
    slow.set()
    server.close()
    assert not waiter.is_alive() and errors


# ---- peers that go quiet: nothing here waits on them for ever ----


def test_a_client_that_sends_no_hello_is_dropped() -> None:
    ended = threading.Event()
    server = DataPlaneServer("127.0.0.1", 0, lambda data: data, None, None, ended.set, hello_timeout=0.3)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            assert ended.wait(5), "the connection's thread still waits for a hello"
            silent.settimeout(5)
            assert silent.recv(1) == b""  # closed by the worker
    finally:
        server.close()


def test_a_hello_sent_a_byte_at_a_time_has_one_deadline_in_all() -> None:
    """The timeout was per read: a byte every few seconds held a connection and its thread for hours, no key
    needed."""
    server = DataPlaneServer("127.0.0.1", 0, lambda data: data, "key", None, hello_timeout=0.5)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as trickle:
            began = time.monotonic()
            trickle.sendall(struct.pack("<I", 100))  # a hello of 100 bytes is announced, then comes slowly
            with pytest.raises(OSError):
                for _ in range(100):  # 10 s of it, were nothing to stop it
                    trickle.sendall(b"\x40")
                    time.sleep(0.1)
            assert time.monotonic() - began < 3
    finally:
        server.close()


def test_connections_that_have_not_said_hello_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataplane, "MAX_GREETING", 2)
    server = DataPlaneServer("127.0.0.1", 0, lambda data: data[::-1], None, None, hello_timeout=5)
    server.start()
    try:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", server.port)) as third:  # accepted after them, in order
            third.settimeout(5)
            assert third.recv(1) == b""  # closed at once: two are still to say hello
        for conn in silent:
            conn.close()
        # Room again once the server has seen them leave: waited for (a 0.3 s sleep guessed; a loaded machine lags)
        deadline = time.monotonic() + 10
        while server._greeting and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.01)
        client = DataPlaneClient("127.0.0.1", server.port, None, None)
        client.connect(timeout=5)
        assert client.exchange(b"ab") == b"ba"
        client.close()
    finally:
        server.close()


def test_an_oversized_hello_is_refused_without_reading_it(
    echo_server: DataPlaneServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with socket.create_connection(("127.0.0.1", echo_server.port)) as client:
        client.sendall(struct.pack("<I", MAX_HELLO_BYTES + 1))  # and never the 4 KB it announces
        client.settimeout(5)
        assert client.recv(1) == b""
    deadline = time.monotonic() + 5
    while "over the 4096-byte limit" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"frame of {MAX_HELLO_BYTES + 1} bytes is over the 4096-byte limit" in caplog.text  # why, in the log


@pytest.mark.parametrize(
    ("first_bytes", "needle"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "a gRPC client: a master given this worker's fast-path port"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "a TLS client on the plaintext fast path"),
        (b"GET / HTTP/1.1\r\n\r\n", "an HTTP client"),
        (struct.pack("<I", 40) + b"CAKE-FWD-0" + bytes(30), "its hello is not this version's"),
    ],
    ids=["grpc", "tls", "http", "old-hello"],
)
def test_what_else_talks_to_the_fast_path_port_is_named_in_the_log(
    echo_server: DataPlaneServer, caplog: pytest.LogCaptureFixture, first_bytes: bytes, needle: str
) -> None:
    """A master pointed at the data port logged 'frame of 541676112 bytes' (the gRPC preface read as a length)."""
    caplog.set_level(logging.WARNING)
    with socket.create_connection(("127.0.0.1", echo_server.port)) as client:
        client.sendall(first_bytes)
        client.settimeout(5)
        with contextlib.suppress(ConnectionError):
            while client.recv(1024):
                pass
    deadline = time.monotonic() + 5
    while needle not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert needle in caplog.text


def test_accept_goes_on_after_a_failure() -> None:
    class FailsOnce:
        """The listener, failing its first accept as when the process is out of descriptors (EMFILE)."""

        def __init__(self, listener: socket.socket) -> None:
            self.listener, self.failed = listener, False

        def accept(self) -> tuple[socket.socket, object]:
            if not self.failed:
                self.failed = True
                raise OSError(24, "Too many open files")
            return self.listener.accept()

        def __getattr__(self, name: str) -> object:
            return getattr(self.listener, name)

    server = DataPlaneServer("127.0.0.1", 0, lambda data: data[::-1], None, None)
    server.listener = FailsOnce(server.listener)  # type: ignore[assignment]
    server.start()
    try:
        client = DataPlaneClient("127.0.0.1", server.port, None, None)
        client.connect(timeout=5)
        assert client.exchange(b"ab") == b"ba"
        client.close()
    finally:
        server.close()


# ---- a TLS connection: frames other threads send are written by the connection's own thread ----


def test_tls_frames_sent_from_other_threads_arrive_in_order(tmp_path: Path) -> None:
    """More frames than the wake pipe holds are queued while the connection's thread is busy in its handler:
    every one arrives, in order, after that handler's own answer."""
    certificates = make_certificates(tmp_path)
    busy, queued = threading.Event(), threading.Event()

    def handler(frame: bytes) -> bytes:
        busy.set()
        assert queued.wait(30)
        return frame[::-1]

    server = DataPlaneServer(
        "127.0.0.1", 0, handler, None, server_tls(certificates.server_cert, certificates.server_key, None)
    )
    server.start()
    client = DataPlaneClient("127.0.0.1", server.port, None, client_tls(None, None, certificates.ca))
    client.connect(timeout=5)
    pushed = [b"pushed %d" % index for index in range(70_000)]  # a pipe holds 65536 wake-up bytes
    try:
        sock = client.send(b"abc")
        assert busy.wait(10)
        assert all(server.send_to_session(client.session, frame) for frame in pushed)
        queued.set()
        assert read_frame(sock) == b"cba"
        assert [read_frame(sock) for _ in pushed] == pushed
    finally:
        queued.set()
        client.close()
        server.close()
