"""The Forward fast path: ForwardRequest/ForwardReply frames on one TCP (optionally TLS) connection per master.

gRPC's Python streams hand every message between two or three threads on each side, and on a VM each wake-up
costs tens to hundreds of microseconds: a decode hop cost 0.6-1.5 ms. Here the master's engine thread writes a
frame and reads the answer itself, and the worker's connection thread reads, computes and answers: one wake-up
per direction. The messages are the same protobuf messages as the gRPC Forward stream (proto/cake/v1).

Framing: a 4-byte little-endian length, then the serialized message. The master's first frame is a hello,
`HELLO_MAGIC`, a 16-byte session id, then the cluster key; the worker answers `b"\\x01"`, or `b"\\x00"` and a
reason, then closes. Control calls (handshake, weights, release, info) stay on gRPC.

This module holds the framing and the worker's end; the outgoing ends are in cake_py.rpc.dataplane_client.

Chained forward: a worker may pass its output straight to the next worker (a `PeerLinks` connection, which is
only ever written to) and the last one answers the master on the master's own connection, found by its session
id: one handoff per stage plus one back, instead of two per stage. That answer is written by another thread than
the connection's own, which a plain TCP socket allows; a TLS connection's state belongs to its own thread (OpenSSL
objects are not safe to read and write from two threads at once), so there the answer is queued and the
connection's thread, woken by a pipe, writes it.
"""

from __future__ import annotations

import hmac
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from cake_py.errors import ClusterError, ConfigError
from cake_py.rpc import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

HELLO_MAGIC = b"CAKE-FWD-3\n"
SESSION_BYTES = 16
MAX_HELLO_BYTES = 4096  # magic + session + cluster key: read before the key is checked, so kept small
# Before its hello is accepted a connection gets this long per read (TLS handshake included): a client that
# connects and sends nothing must not hold a thread and a socket for ever.
HELLO_TIMEOUT_S = 10.0
MAX_GREETING = 64  # connections that have not said hello yet; past it more are closed at once
REFUSED_LOG_S = 10.0  # at most one line this often about connections refused past MAX_GREETING
_LENGTH = struct.Struct("<I")


class FrameTooLarge(ConnectionError):
    """A peer announced a frame over the limit: the stream cannot be read past it, so the connection ends."""

    def __init__(self, message: str, head: bytes) -> None:
        super().__init__(message)
        self.head = head  # the length's bytes as they came: they tell what else is talking to this port


def _stranger(head: bytes) -> str:
    """What a connection whose first bytes are no length of ours most likely is, for the log."""
    if head.startswith(b"PRI "):
        return "a gRPC client: a master given this worker's fast-path port (--data-port) instead of its port?"
    if head[:1] == b"\x16" and head[1:2] == b"\x03":
        return "a TLS client on the plaintext fast path: start the worker with --tls-cert/--tls-key as well"
    if head[:4] in (b"GET ", b"POST", b"HEAD", b"PUT "):
        return "an HTTP client, not a cake master"
    return "not a cake master (or one speaking another protocol)"


def _read_exact(sock: socket.socket, size: int, deadline: float | None = None) -> bytes:
    chunks, remaining = [], size
    while remaining:
        if deadline is not None:  # a whole-read deadline: a byte every few seconds must not keep a read going
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the frame took too long to arrive")
            sock.settimeout(left)
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def read_frame(sock: socket.socket, limit: int = MAX_MESSAGE_BYTES, deadline: float | None = None) -> bytes:
    head = _read_exact(sock, _LENGTH.size, deadline)
    (size,) = _LENGTH.unpack(head)
    if size > limit:
        raise FrameTooLarge(f"frame of {size} bytes is over the {limit}-byte limit", head)
    return _read_exact(sock, size, deadline) if size else b""


def write_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def server_tls(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # No session tickets: nothing is resumed, and a worker's peer link reads nothing after the hello (anything
    # readable there means the other end closed it).
    context.num_tickets = 0
    try:
        context.load_cert_chain(str(cert), str(key))
        if ca is not None:
            context.load_verify_locations(str(ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load TLS files {str(cert)!r}/{str(key)!r}: {error}") from error
    return context


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Keepalive probes find a peer whose host died without closing (power, network cut) in about a minute.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class _Session:
    """An accepted connection: its own thread reads it and answers (`answer`); other threads write frames on it
    with `send` (chained replies to the master)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.lock = threading.Lock()  # writers; and `closed`
        self.closed = False
        self.tls = isinstance(conn, ssl.SSLSocket)
        # TLS: frames other threads send wait here for the connection's thread, woken through the pipe.
        self.outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.wake_read, self.wake_write = os.pipe() if self.tls else (-1, -1)
        self.poller = select.poll()  # poll, not select: descriptors may be numbered past select's 1024
        if self.tls:
            os.set_blocking(self.wake_write, False)  # a full pipe already holds a wake-up
            self.poller.register(conn, select.POLLIN)
            self.poller.register(self.wake_read, select.POLLIN)

    def send(self, payload: bytes) -> None:
        """Write a frame from any thread."""
        with self.lock:
            if self.closed:
                raise ConnectionError("the connection closed")
            if self.tls:
                self.outbox.put(payload)
                try:
                    os.write(self.wake_write, b"\0")
                except BlockingIOError:
                    pass
            else:
                write_frame(self.conn, payload)

    def answer(self, payload: bytes) -> None:
        """Write a frame from the connection's own thread (on TLS the only writer: no lock to hold up `send`)."""
        if self.tls:
            write_frame(self.conn, payload)
        else:
            with self.lock:
                write_frame(self.conn, payload)

    def next_frame(self) -> bytes:
        """The next frame the peer sends (the connection's own thread); on TLS, queued frames are written meanwhile."""
        if isinstance(self.conn, ssl.SSLSocket):
            fd = self.conn.fileno()
            while not self.conn.pending():  # bytes already decrypted, which poll cannot see
                ready = {ready_fd for ready_fd, _ in self.poller.poll()}
                if self.wake_read in ready:
                    os.read(self.wake_read, 4096)
                    while not self.outbox.empty():
                        self.answer(self.outbox.get())
                if fd in ready:  # data, or the peer closed it (read_frame says which)
                    break
        return read_frame(self.conn)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self.tls:
                os.close(self.wake_read)
                os.close(self.wake_write)
            self.conn.close()


class DataPlaneServer:
    """Accepts fast-path connections; each is served by its own thread calling `handler`.

    `handler` returns the frame to answer with, or None when it answered elsewhere (a chained forward). Each
    connection's thread calls it inside one `thread_context` (the worker's torch.inference_mode): entered once per
    connection, not per frame, where it would cost tens of microseconds with caches cold from the layers.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[bytes], bytes | None],
        cluster_key: str | None,
        tls: ssl.SSLContext | None,
        on_connection_end: Callable[[], None] = lambda: None,
        thread_context: Callable[[], AbstractContextManager[object]] = nullcontext,
        hello_timeout: float = HELLO_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.hello_timeout = hello_timeout
        self.thread_context = thread_context
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
        # Open connections by the session id of their hello.
        self._sessions: dict[bytes, _Session] = {}
        self._greeting = 0  # connections accepted that have not said hello yet
        self._refused, self._refused_logged_at = 0, float("-inf")  # refused past MAX_GREETING since the last line
        self._sessions_lock = threading.Lock()  # both

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
            except OSError as error:
                if self._closed.is_set():
                    return
                # Out of descriptors (EMFILE), say: the fast path must come back once some are free.
                log.warning("forward fast path: accept failed: %s", error)
                self._closed.wait(0.5)
                continue
            with self._sessions_lock:
                crowded = self._greeting >= MAX_GREETING
                self._greeting += not crowded
            if crowded:  # connections that have not said hello yet: each holds a thread until it does
                self._refused += 1
                if time.monotonic() >= self._refused_logged_at + REFUSED_LOG_S:  # a flood: a line now and then
                    log.warning(
                        "forward fast path: %d connections have not said hello; refused %d (the latest from %s)",
                        MAX_GREETING, self._refused, peer,
                    )  # fmt: skip
                    self._refused, self._refused_logged_at = 0, time.monotonic()
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, peer), name="cake-forward", daemon=True).start()
            except RuntimeError as error:  # no thread to be had (a thread or memory limit): refuse this one, go on
                log.warning("forward fast path: cannot serve a connection from %s: %s", peer, error)
                self._greeted()
                conn.close()
                self._closed.wait(0.5)

    def _greeted(self) -> None:
        with self._sessions_lock:
            self._greeting -= 1

    def send_to_session(self, session: bytes, payload: bytes) -> bool:
        """Write a frame on the connection whose hello carried `session`; False if it is gone or broke."""
        with self._sessions_lock:
            entry = self._sessions.get(session)
        if entry is None:
            return False
        try:
            entry.send(payload)
        except (OSError, ssl.SSLError, ConnectionError):
            return False
        return True

    def _serve(self, conn: socket.socket, peer: object) -> None:
        session, entry, greeting = b"", None, True
        try:
            tune_socket(conn)
            conn.settimeout(self.hello_timeout)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            hello = read_frame(conn, MAX_HELLO_BYTES, time.monotonic() + self.hello_timeout)
            greeting = False
            self._greeted()
            if not hello.startswith(HELLO_MAGIC) or len(hello) < len(HELLO_MAGIC) + SESSION_BYTES:
                log.warning(
                    "refused a forward connection from %s: its hello is not this version's (%r): a master of "
                    "another cake version?", peer, hello[: len(HELLO_MAGIC)],
                )  # fmt: skip
                write_frame(conn, b"\x00not a cake forward connection (protocol mismatch)")
                return
            key = hello[len(HELLO_MAGIC) + SESSION_BYTES :]
            if self.key and not hmac.compare_digest(key, self.key):
                log.warning("refused a forward connection from %s: wrong or missing cluster key", peer)
                write_frame(conn, b"\x00cluster key rejected")
                return
            session = hello[len(HELLO_MAGIC) : len(HELLO_MAGIC) + SESSION_BYTES]
            entry = _Session(conn)
            with self._sessions_lock:
                self._sessions[session] = entry
            write_frame(conn, b"\x01")
            conn.settimeout(None)  # a known master: between its steps the connection may idle for hours
            with self.thread_context():
                while True:
                    answer = self.handler(entry.next_frame())
                    if answer is not None:
                        entry.answer(answer)
        except FrameTooLarge as error:  # not a master of this protocol, or a broken one: say why it was dropped
            what = _stranger(error.head) if greeting else "a broken master"
            log.warning("forward connection from %s closed: %s (%s)", peer, error, what)
        except ssl.SSLError as error:
            if greeting:  # a plaintext client on a TLS port, a certificate refused: the master's error is vaguer
                log.warning("forward connection from %s: TLS handshake failed: %s", peer, error.reason or error)
        except TimeoutError:
            if greeting:
                log.info("forward connection from %s closed: no hello within %.0f s", peer, self.hello_timeout)
        except (OSError, ConnectionError):
            pass  # the master went away; its sequences are released by Release or the idle timeout
        except Exception:  # a bug: into the log, not a silent thread death
            log.exception("forward connection from %s failed", peer)
        finally:
            with self._sessions_lock:
                if entry is not None and self._sessions.get(session) is entry:
                    del self._sessions[session]
                if greeting:  # it never said hello
                    self._greeting -= 1
            if entry is not None:
                entry.close()
            else:
                conn.close()
            self.on_connection_end()
