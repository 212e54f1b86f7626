"""The outgoing ends of the Forward fast path (cake_py.rpc.dataplane): the master's connection to each worker
(`DataPlaneClient`), and a worker's write-only links to the next workers of chained forwards (`PeerLinks`)."""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
from pathlib import Path

from cake_py.errors import ClusterError, ConfigError
from cake_py.rpc.dataplane import HELLO_MAGIC, SESSION_BYTES, read_frame, tune_socket, write_frame

# A worker's write to the next worker of a chain. Its connection thread also serves its master, so a next worker
# that stops reading (frozen, or its link silently dead) must fail the send, not hold that thread until TCP gives up.
PEER_SEND_TIMEOUT_S = 30.0


def client_tls(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None and ca is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"--tls-ca {str(ca)!r} is not a PEM CA bundle: {error}") from None
    try:
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"--tls-cert {str(cert)!r} and --tls-key {str(key)!r} are not a PEM certificate and its key: {error}"
        ) from None
    return context


class DataPlaneClient:
    """The master's end of one fast-path connection: `exchange` sends a frame and returns the answer."""

    def __init__(self, host: str, port: int, cluster_key: str | None, tls: ssl.SSLContext | None) -> None:
        self.host, self.port = host, port
        self.key = (cluster_key or "").encode()
        self.tls = tls
        self.session = os.urandom(SESSION_BYTES)  # how the worker names this connection in chained replies
        self.sock: socket.socket | None = None
        self._poller = select.poll()  # the socket, for `closed_by_peer`; poll, not select: fds may pass 1024

    def connect(self, timeout: float) -> None:
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            tune_socket(sock)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            write_frame(sock, HELLO_MAGIC + self.session + self.key)
            answer = read_frame(sock)
        except (OSError, ssl.SSLError, ConnectionError, UnicodeError) as error:  # UnicodeError: a host IDNA refuses
            if sock is not None:  # connected, then the hello failed (timed out): the socket is this one's to close
                sock.close()
            raise ClusterError(f"forward fast path to {self.host}:{self.port} failed: {error}") from None
        if answer != b"\x01":
            sock.close()
            reason = answer[1:].decode(errors="replace")
            raise ClusterError(f"forward fast path to {self.host}:{self.port} refused: {reason}")
        sock.settimeout(None)  # a hung worker is caught by the stage's health monitor, which closes this socket
        self._poller.register(sock, select.POLLIN)
        self.sock = sock

    def exchange(self, payload: bytes) -> bytes:
        sock = self.send(payload)
        return read_frame(sock)

    def send(self, payload: bytes) -> socket.socket:
        """Write one frame; returns the socket, to read the answer from."""
        sock = self.sock
        if sock is None:
            raise ConnectionError("the forward fast path is closed")
        write_frame(sock, payload)
        return sock

    def closed_by_peer(self) -> bool:
        """Whether a write-only link was closed at the other end. Its peer never writes after the hello, so anything
        readable is the end of the stream; a write would still succeed once and the frame would be lost."""
        return self.sock is None or bool(self._poller.poll(0))

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self._poller.unregister(sock)
            try:
                # Unblocks a thread waiting in recv. The plain socket's shutdown, also for TLS: SSLSocket.shutdown
                # drops the TLS state before the descriptor, and a write from another thread (the chain's sender,
                # when the health monitor closes this) landing in between went out unencrypted.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class PeerLinks:
    """A worker's write-only connections to the next workers of chained forwards, opened on first use; over TLS
    when `tls` is given (the worker's own certificate, and its CA to verify the next one)."""

    def __init__(
        self,
        cluster_key: str | None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        send_timeout: float = PEER_SEND_TIMEOUT_S,
    ) -> None:
        self.key = cluster_key
        self.tls = tls
        self.timeout = timeout
        self.send_timeout = send_timeout
        self._links: dict[tuple[str, int], DataPlaneClient] = {}
        self._link_locks: dict[tuple[str, int], threading.Lock] = {}  # a send, connect included, per link
        self._lock = threading.Lock()  # the two dicts

    def send(self, host: str, port: int, payload: bytes) -> None:
        """One frame to the worker at host:port; a broken link is reopened once. ClusterError when unreachable.
        Each link has its own lock: one master's slow next hop (connecting, or not reading) holds up no other."""
        key = (host, port)
        with self._lock:
            lock = self._link_locks.setdefault(key, threading.Lock())
        with lock:
            link = self._links.get(key)
            for attempt in range(2):
                if link is None:
                    self._prune(key)
                    link = DataPlaneClient(host, port, self.key, self.tls)
                    link.connect(self.timeout)  # ClusterError, naming host:port
                    assert link.sock is not None
                    link.sock.settimeout(self.send_timeout)  # a frame whose sendall times out closes the link
                    with self._lock:
                        self._links[key] = link
                try:
                    if link.closed_by_peer():
                        raise ConnectionError("the next worker closed the connection (it restarted?)")
                    link.send(payload)
                    return
                except (OSError, ConnectionError) as error:
                    link.close()
                    with self._lock:
                        self._links.pop(key, None)
                    link = None
                    if attempt:
                        raise ClusterError(f"forward to {host}:{port} failed: {error}") from None

    def _prune(self, keep: tuple[str, int]) -> None:
        """Close the links whose worker closed them: a restarted next worker listens on a new port, so its old link
        was never sent on again and held its socket for good (one per restart). Links busy sending are left."""
        with self._lock:
            others = [(key, link) for key, link in self._links.items() if key != keep]
        for key, link in others:
            lock = self._link_locks.get(key)
            if lock is None or not lock.acquire(blocking=False):
                continue
            try:
                if link.closed_by_peer():
                    link.close()
                    with self._lock:
                        if self._links.get(key) is link:
                            del self._links[key]
            finally:
                lock.release()

    def close(self) -> None:
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.close()
