"""uvicorn's HTTP/1.1 protocol with a deadline for each request's head (request line and headers), and for a client
that stops reading its answer.

uvicorn times only the idle gap after a response, and forgets it at the first byte of the next request: a client
that opens a connection and sends nothing, or a header byte every few seconds (slowloris), held that connection and
its file descriptor for ever; a few hundred of them and the server could not accept anyone. Here the head of every
request must arrive within `HEAD_TIMEOUT_S` of the connection opening or of the previous response: a half-sent head
gets a 408 and the connection is closed; a connection that sent nothing is closed, as uvicorn closes an idle
keep-alive one. The body has its own timeout (`middleware.BodyLimitMiddleware`); answers may take as long as they
take.

A client that keeps its connection open but stops reading (a slow reader) held its stream's slot in the engine, which
went on generating into a buffer nobody read until max_tokens, and then held the connection and that buffer for ever:
uvicorn waits for the socket to drain without a limit. Here, once the socket's buffers are full (asyncio pauses the
writes), the client must take some of the waiting bytes every `WRITE_STALL_TIMEOUT_S` (nginx's send_timeout: the time
between two successful writes, not for the whole answer); if it takes none, the connection is dropped, which ends the
request as a disconnect does (its sequence is cancelled, its slot and caches freed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if sys.platform == "linux":  # the socket's send queue (TIOCOUTQ) is read on Linux only
    import fcntl
    import termios

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0  # a real client sends its headers in one packet; a proxy's slow link still does in seconds
WRITE_STALL_TIMEOUT_S = 60.0  # nginx's send_timeout: a slow link still takes some bytes this often


class HeadTimeoutProtocol(H11Protocol):
    head_timeout = HEAD_TIMEOUT_S
    write_stall_timeout = WRITE_STALL_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False  # a byte of the awaited request's head has arrived
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_buffered = 0  # bytes waiting to be written when the stall timer was armed
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_stall_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_stall_timer()

    def resume_writing(self) -> None:
        self._cancel_stall_timer()
        super().resume_writing()

    def _unsent(self) -> int:
        """Bytes written but not yet taken by the client: asyncio's buffer, and on Linux the socket's send queue.
        The socket's queue counts: the kernel wakes asyncio's writer only once half of it has drained, which takes
        a slow client (or a link far away) much longer than taking some of it."""
        size = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sys.platform == "linux" and sock is not None:
            try:
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            except OSError:  # closed under us: asyncio's buffer tells enough
                return size
            size += struct.unpack("i", queued)[0]
        return size

    def _arm_stall_timer(self) -> None:
        self._cancel_stall_timer()
        self._stall_buffered = self._unsent()
        self._stall_timer = self.loop.call_later(self.write_stall_timeout, self._write_stalled)

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _write_stalled(self) -> None:
        self._stall_timer = None
        if not self.transport.get_write_buffer_size():  # drained: resume_writing comes, or the connection is closing
            return
        if self._unsent() < self._stall_buffered:  # it took some: a slow link, not a stall
            self._arm_stall_timer()
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("%s read nothing of its answer in %g s: dropping its connection", client, self.write_stall_timeout)
        # abort, not close: close waits for the buffer to drain, which is what never happens
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None and data:
            self._head_begun = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # a whole head came: its request runs
            self._cancel_head_timer()
        else:
            self._await_next_head()  # an answer sent before its request's body ended: that body has ended now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_next_head()

    def _await_next_head(self) -> None:
        """Start timing the next request's head once the last request is all read (its body may still be arriving
        after an early answer, such as a 401: those bytes are not a head) and no pipelined request has started."""
        idle = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if idle and self._head_timer is None and not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_begun = False
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_begun:  # a request was being sent: say why it is dropped (nginx's client_header_timeout)
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info(
                "%s did not send a whole request head in %.0f s: closing its connection", client, self.head_timeout
            )
            body = json.dumps({"error": f"the request head did not arrive within {self.head_timeout:g} s"}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
        self.transport.close()
