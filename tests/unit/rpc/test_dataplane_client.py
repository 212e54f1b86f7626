"""The fast path's outgoing ends: a worker nobody listens on, and next workers that go quiet or stop reading, never
hold up more than their own link."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from cake_py.errors import ClusterError
from cake_py.rpc.dataplane import DataPlaneServer, read_frame, write_frame
from cake_py.rpc.dataplane_client import DataPlaneClient, PeerLinks
from tests.fixtures.tls import make_certificates


def test_nothing_listening_is_a_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port}"):
        DataPlaneClient("127.0.0.1", port, None, None).connect(timeout=2)


def test_a_next_worker_that_stops_reading_fails_the_send() -> None:
    """A worker's link to the next one: that worker answers the hello, then reads nothing (frozen). The send
    fails within its timeout, as a ClusterError naming the address, instead of blocking the sending thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []

    def frozen_worker() -> None:
        for _ in range(2):  # the first link, and the one reopened after it failed
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            read_frame(conn)
            write_frame(conn, b"\x01")

    thread = threading.Thread(target=frozen_worker, daemon=True)
    thread.start()
    links = PeerLinks(None, timeout=5, send_timeout=0.3)
    try:
        began = time.monotonic()
        with pytest.raises(ClusterError, match=f"127.0.0.1:{port}.*timed out"):
            links.send("127.0.0.1", port, bytes(64 << 20))  # far more than the socket buffers hold
        assert time.monotonic() - began < 5
    finally:
        links.close()
        listener.close()
        thread.join(timeout=5)
        for conn in held:
            conn.close()


def test_a_slow_next_worker_holds_up_no_other_link() -> None:
    """One lock for every link made a next hop that accepts and never answers the hello (or stops reading) stall
    every other master's chained forwards through this worker."""
    mute = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    mute.settimeout(10)
    healthy = DataPlaneServer("127.0.0.1", 0, lambda data: None, None, None)
    healthy.start()
    links = PeerLinks(None, timeout=6)  # what a send held up behind the mute link would wait: far past the bound below
    failed: list[Exception] = []
    accepted: list[socket.socket] = []

    def to_the_mute_one() -> None:
        try:
            links.send("127.0.0.1", mute.getsockname()[1], b"x")
        except ClusterError as error:
            failed.append(error)

    stuck = threading.Thread(target=to_the_mute_one, daemon=True)
    try:
        stuck.start()
        accepted.append(mute.accept()[0])  # it is connected now, waiting for the hello's answer (a sleep guessed)
        began = time.monotonic()
        links.send("127.0.0.1", healthy.port, b"y")
        assert time.monotonic() - began < 3.0  # a loaded machine's margin; held up, it would wait ~6 s
        stuck.join(timeout=20)
        assert failed and "timed out" in str(failed[0])
    finally:
        links.close()
        healthy.close()
        mute.close()
        for connection in accepted:
            connection.close()


def test_links_to_a_next_worker_that_restarted_on_a_new_port_are_closed() -> None:
    """A restarted next worker listens on a new data port: the link to its old port was never sent on again and
    kept its socket, one more each restart (CLOSE-WAIT in ss)."""
    links = PeerLinks(None, timeout=2)
    alive = DataPlaneServer("127.0.0.1", 0, lambda data: None, None, None)
    try:
        for _ in range(3):  # a next worker that answers the hello, takes a frame, and dies (its process ends)
            with socket.create_server(("127.0.0.1", 0)) as listener:
                port = listener.getsockname()[1]
                sender = threading.Thread(target=links.send, args=("127.0.0.1", port, b"frame"), daemon=True)
                sender.start()
                conn, _ = listener.accept()
                read_frame(conn)  # the hello
                write_frame(conn, b"\x01")
                sender.join(timeout=5)
                conn.close()
        deadline = time.monotonic() + 5
        while not all(link.closed_by_peer() for link in links._links.values()):  # noqa: SLF001
            assert time.monotonic() < deadline, "the dead workers' ends never read closed"
            time.sleep(0.01)
        alive.start()
        links.send("127.0.0.1", alive.port, b"frame")  # a new link: those closed at the other end go
        assert len(links._links) == 1  # noqa: SLF001
    finally:
        links.close()
        alive.close()


def test_closing_a_tls_link_never_lets_a_concurrent_write_out_in_plaintext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() runs on the stage's health monitor thread while the chain's sender may be writing the same socket.
    SSLSocket.shutdown drops the TLS state before it shuts the descriptor, so a write landing in between went out
    unencrypted. The write here lands exactly there; the worker end reads the bytes as they crossed the network."""
    certificates = make_certificates(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificates.server_cert, certificates.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    secret = b"hidden states in plaintext"
    on_the_wire = bytearray()

    def worker() -> None:
        raw, _ = listener.accept()
        with server.wrap_socket(raw, server_side=True) as conn:
            read_frame(conn)  # the hello
            write_frame(conn, b"\x01")
            while chunk := socket.socket.recv(conn, 65536):  # under TLS: what the network carried
                on_the_wire.extend(chunk)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    client = DataPlaneClient("127.0.0.1", port, None, ssl.create_default_context(cafile=str(certificates.ca)))
    try:
        client.connect(timeout=5)
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        plain_shutdown = socket.socket.shutdown

        def sender_writes_meanwhile(self: socket.socket, how: int) -> None:
            if self is sock:
                sock.send(secret)  # the sender's next write, between close()'s start and the descriptor's shutdown
            plain_shutdown(self, how)

        monkeypatch.setattr(socket.socket, "shutdown", sender_writes_meanwhile)
        client.close()
        thread.join(timeout=5)
    finally:
        listener.close()
    assert not thread.is_alive()
    assert on_the_wire and secret not in on_the_wire  # the write went out, encrypted
