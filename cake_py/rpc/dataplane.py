"""The Forward fast path: ForwardRequest/ForwardReply frames on one TCP (optionally TLS) connection per master.

gRPC's Python streams hand every message between two or three threads on each side, and on a VM each wake-up
costs tens to hundreds of microseconds: a decode hop cost 0.6-1.5 ms. Here the master's engine thread writes a
frame and reads the answer itself, and the worker's connection thread reads, computes and answers: one wake-up
per direction. The messages are the same protobuf messages as the gRPC Forward stream (proto/cake/v1).

Framing: a 4-byte little-endian length, then the serialized message. The master's first frame is a hello,
`HELLO_MAGIC` followed by the cluster key; the worker answers `b"\\x01"`, or `b"\\x00"` and a reason, then closes.
Control calls (handshake, weights, release, info) stay on gRPC.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from cake_py.errors import ClusterError, ConfigError
from cake_py.rpc import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

HELLO_MAGIC = b"CAKE-FWD-2\n"
_LENGTH = struct.Struct("<I")


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def read_frame(sock: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(_read_exact(sock, _LENGTH.size))
    if size > MAX_MESSAGE_BYTES:
        raise ConnectionError(f"frame of {size} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    return _read_exact(sock, size) if size else b""


def write_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def server_tls(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
        if ca is not None:
            context.load_verify_locations(str(ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load TLS files {str(cert)!r}/{str(key)!r}: {error}") from error
    return context


def client_tls(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None and ca is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load TLS files: {error}") from error
    return context


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DataPlaneServer:
    """Accepts masters' fast-path connections; each is served by its own thread calling `handler`."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[bytes], bytes],
        cluster_key: str | None,
        tls: ssl.SSLContext | None,
        on_connection_end: Callable[[], None] = lambda: None,
    ) -> None:
        self.handler = handler
        self.key = (cluster_key or "").encode()
        self.tls = tls
        self.on_connection_end = on_connection_end
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
        except OSError as error:
            self.listener.close()
            raise ClusterError(f"cannot listen for the forward fast path on {host}:{port}: {error.strerror}") from None
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="cake-dataplane", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), name="cake-forward", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        try:
            _tune(conn)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            hello = read_frame(conn)
            if not hello.startswith(HELLO_MAGIC):
                write_frame(conn, b"\x00not a cake forward connection (protocol mismatch)")
                return
            if self.key and not hmac.compare_digest(hello[len(HELLO_MAGIC) :], self.key):
                log.warning("refused a forward connection from %s: wrong or missing cluster key", peer)
                write_frame(conn, b"\x00cluster key rejected")
                return
            write_frame(conn, b"\x01")
            while True:
                write_frame(conn, self.handler(read_frame(conn)))
        except (OSError, ssl.SSLError, ConnectionError):
            pass  # the master went away; its sequences are released by Release or the idle timeout
        finally:
            conn.close()
            self.on_connection_end()


class DataPlaneClient:
    """The master's end of one fast-path connection: `exchange` sends a frame and returns the answer."""

    def __init__(self, host: str, port: int, cluster_key: str | None, tls: ssl.SSLContext | None) -> None:
        self.host, self.port = host, port
        self.key = (cluster_key or "").encode()
        self.tls = tls
        self.sock: socket.socket | None = None

    def connect(self, timeout: float) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            _tune(sock)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            write_frame(sock, HELLO_MAGIC + self.key)
            answer = read_frame(sock)
        except (OSError, ssl.SSLError, ConnectionError) as error:
            raise ClusterError(f"forward fast path to {self.host}:{self.port} failed: {error}") from None
        if answer != b"\x01":
            sock.close()
            raise ClusterError(f"forward fast path to {self.host}:{self.port} refused: {answer[1:].decode()}")
        sock.settimeout(None)  # a hung worker is caught by the stage's health monitor, which closes this socket
        self.sock = sock

    def exchange(self, payload: bytes) -> bytes:
        sock = self.sock
        if sock is None:
            raise ConnectionError("the forward fast path is closed")
        write_frame(sock, payload)
        return read_frame(sock)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks a thread waiting in recv
            except OSError:
                pass
            sock.close()
