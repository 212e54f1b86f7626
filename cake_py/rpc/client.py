"""RemoteStage: layers [start, end) on a worker, behind the same protocol as LocalStage.

Hidden states take the forward fast path (cake_py.rpc.dataplane) when the worker offers one, else one long-lived
gRPC Forward stream; one message each way per step either way. A monitor thread pings the worker every second:
when its connection closes (the worker died) or it has answered nothing for SILENT_DOWN_S (a late ping is only a
stall: a GC pause, swapping, a CPU-starved VM), the stage turns down (in-flight calls fail at once, /health turns
503), and the monitor reconnects with backoff, re-assigning the layers (from the worker's disk cache) so the cluster
serves again without a restart.
"""

from __future__ import annotations

import logging
import queue
import re
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from cake_py.cluster.stage import StageStats
from cake_py.errors import ClusterError, StageError, WorkerSilentError
from cake_py.models.kv_cache import Batch
from cake_py.rpc.chain import (
    REQUEST_IDS,
    PieceStep,
    forward_chain,
    forward_chain_pieces,
    on_device_of,
    wire_slices,
)
from cake_py.rpc.codec import decode_tensor, encode_tensor
from cake_py.rpc.connection import (
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    TAKEOVER_IDLE_S,
    Assignment,
    WorkerConnection,
)
from cake_py.rpc.dataplane import read_frame
from cake_py.rpc.dataplane_client import DataPlaneClient
from cake_py.rpc.pb import worker_pb2 as pb
from cake_py.rpc.stage_description import describe_remote

__all__ = ["Assignment", "RemoteStage", "WorkerConnection"]

log = logging.getLogger(__name__)

FAST_RETRY_MAX_S = 60.0
# A worker whose connection is open but that has answered no ping for this long is down: the requests it holds fail
# and /health turns 503. A shorter silence is a latency spike its requests wait out (one missed ping used to fail
# every request in flight, though the worker was back a second later). While it is silent it is pinged again at
# once, so it is down this long after its last answer, give or take a ping's timeout.
SILENT_DOWN_S = 5.0
# A forward unanswered this long, by a worker that answers its pings and has worked on no forward as long, was lost
# (dropped on the worker's side): the stage turns down and the step fails, as a chained one does (chain.CHAIN_STALL_S).
FORWARD_LOST_S = 30.0
_DIGITS = re.compile(r"[0-9]+")


class RemoteStage:
    """Layers [start, end) on a worker, behind the same protocol as LocalStage."""

    def __init__(self, connection: WorkerConnection, assignment: Assignment) -> None:
        self.connection = connection
        self.assignment = assignment
        self.name = connection.spec.name
        self.address: str | None = connection.spec.address
        self.start, self.end = assignment.start, assignment.end
        self.stats = StageStats()
        self._up = True
        self._status_error = ""
        self._lock = threading.Lock()  # guards the stream objects, not the engine (the only forward caller)
        self._outbox: queue.SimpleQueue[pb.ForwardRequest | None] | None = None
        self._call: Any = None
        self._fast: DataPlaneClient | None = None
        # After a failed fast-path connect, the gRPC stream carries the calls until this time (monotonic); the wait
        # doubles with each failure.
        self._fast_retry_at, self._fast_backoff = 0.0, 0.0
        self._chain_off = False  # a worker of a chain could not reach the next one: this stage is not chained again
        self.chained_calls = 0  # forward passes this stage ran inside a chained call
        self._closing = threading.Event()
        self._last_info: pb.InfoReply | None = None
        self._info_at = 0.0  # time.monotonic() of the last ping's answer
        self._answered_at = time.monotonic()  # of the last answer (a ping's, or the Assign that made it up)
        self._late = False  # the last ping went unanswered (the worker is silent, not yet for SILENT_DOWN_S)
        self._worked_at = 0.0  # when, by that answer, the worker last worked on a forward (now: working, or can't say)
        self._sent_at: float | None = None  # when the forward now waiting for this worker's answer was sent
        # Sequences finished while the worker was down: it may still hold their caches (a network cut, a pause),
        # so they are released once it is back.
        self._unreleased: set[int] = set()
        self._unreleased_lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name=f"cake-monitor-{self.name}", daemon=True)
        self._monitor.start()

    # ---- the stream ----
    def _stream(self) -> tuple[queue.SimpleQueue[pb.ForwardRequest | None], Any]:
        with self._lock:
            if self._call is None or self._outbox is None:
                outbox: queue.SimpleQueue[pb.ForwardRequest | None] = queue.SimpleQueue()

                def requests() -> Iterator[pb.ForwardRequest]:
                    while (item := outbox.get()) is not None:
                        yield item

                stub = self.connection._open()
                self._call = stub.Forward(requests(), metadata=self.connection.metadata)
                self._outbox = outbox
            return self._outbox, self._call

    def _fast_path(self) -> DataPlaneClient | None:
        """The fast-path connection, opened on first use; None when the worker offers none, or while a failed
        connect waits to be tried again (1 s, doubling to a minute: one failure must not cost it for good)."""
        if self._fast is None and self.connection.data_port and time.monotonic() >= self._fast_retry_at:
            host = self.connection.spec.address.rpartition(":")[0].strip("[]")
            client = DataPlaneClient(host, self.connection.data_port, self.connection.cluster_key, self.connection.tls)
            try:
                client.connect(timeout=PING_TIMEOUT_S)
            except ClusterError as error:
                self._fast_backoff = min(self._fast_backoff * 2, FAST_RETRY_MAX_S) if self._fast_backoff else 1.0
                self._fast_retry_at = time.monotonic() + self._fast_backoff
                log.warning(
                    "%s: %s; using the gRPC Forward stream, fast path tried again in %.0f s",
                    self.connection.label, error, self._fast_backoff,
                )  # fmt: skip
                return None
            if self._fast_backoff:
                log.info("%s: fast path back", self.connection.label)
            with self._lock:
                self._fast, self._fast_backoff = client, 0.0
        return self._fast

    @property
    def transport(self) -> str:
        """How hidden states travel to this worker: "fast" or "fast+tls" (the socket path), "grpc" (the stream)."""
        fast = self._fast
        if fast is not None and fast.sock is not None:
            return "fast+tls" if isinstance(fast.sock, ssl.SSLSocket) else "fast"
        return "grpc"

    def _drop_stream(self) -> None:
        with self._lock:
            if self._fast is not None:
                self._fast.close()
            self._fast, self._fast_retry_at, self._fast_backoff = None, 0.0, 0.0
            if self._outbox is not None:
                self._outbox.put(None)
            if self._call is not None:
                self._call.cancel()
            self._outbox, self._call = None, None

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self._up:
            raise StageError(f"{self.connection.label} is down: {self._status_error}")
        self.starting_over(batch)
        began = time.perf_counter()
        request = pb.ForwardRequest(
            request_id=next(REQUEST_IDS),
            sequences=wire_slices(batch),
            assignment=self.connection.assignment,
        )
        encode_tensor(hidden, out=request.hidden)
        self._sent_at = time.monotonic()  # the monitor marks the worker down if this forward is lost
        try:
            reply = self._exchange(request)
        finally:
            self._sent_at = None
        if reply.error:
            raise StageError(f"{self.connection.label}: {reply.error}")
        out = on_device_of(decode_tensor(reply.hidden), hidden)
        if out.shape != hidden.shape:  # the layers keep the shape: anything else is not this batch's answer
            raise StageError(
                f"{self.connection.label} answered hidden states of shape {list(out.shape)} for a batch of shape "
                f"{list(hidden.shape)}"
            )
        round_trip_ms = (time.perf_counter() - began) * 1000
        self.stats.record(reply.forward_us / 1000, round_trip_ms, len(request.hidden.data), len(reply.hidden.data))
        return out

    def _exchange(self, request: pb.ForwardRequest) -> pb.ForwardReply:
        """`request` sent, on the fast path or the gRPC stream, and its answer."""
        fast = self._fast_path()
        if fast is not None:
            try:
                sock = fast.send(request.SerializeToString())
                reply = pb.ForwardReply.FromString(read_frame(sock))
                # A chained step that failed may still be answered here later: such answers are skipped. An error
                # without an id (the worker could not parse the request) is this request's answer.
                while reply.request_id != request.request_id and not (reply.error and not reply.request_id):
                    reply = pb.ForwardReply.FromString(read_frame(sock))
            except (OSError, ConnectionError, DecodeError) as error:
                raise self._broken(error) from None
            return reply
        outbox, call = self._stream()
        outbox.put(request)
        try:
            return next(call)
        except (grpc.RpcError, StopIteration) as error:
            self._mark_down(str(error.details() if isinstance(error, grpc.Call) else "stream ended"))
            raise StageError(f"{self.connection.label} failed during a forward pass: {self._status_error}") from None

    # ---- chained forward ----
    def chainable(self) -> bool:
        """Whether this stage can take part in a chained forward: up, on the fast path."""
        if not self._up or self._chain_off:
            return False
        fast = self._fast_path()
        return fast is not None and fast.sock is not None

    def forward_chain(
        self, followers: Sequence[RemoteStage], hidden: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, int]:
        """This stage and then `followers`, each worker passing its output to the next (cake_py.rpc.chain)."""
        for stage in (self, *followers):
            stage.starting_over(batch)
        return forward_chain([self, *followers], hidden, batch)

    def forward_pieces(
        self,
        followers: Sequence[RemoteStage],
        pieces: Sequence[tuple[torch.Tensor, Batch]],
        lead: PieceStep | None = None,
        trail: PieceStep | None = None,
    ) -> list[torch.Tensor] | None:
        """A step's pieces through this stage and `followers` at once, pipelined (cake_py.rpc.chain)."""
        for stage in (self, *followers):
            for _, batch in pieces:
                stage.starting_over(batch)
        return forward_chain_pieces([self, *followers], pieces, lead, trail)

    def starting_over(self, batch: Batch) -> None:
        """The sequences `batch` computes from their first position, or copies afresh, get new caches here: a
        Release still pending for their old ones (a failed one, sent again at the next ping) must not free those.
        The engine computes a sequence again under its own id (a failover's restart, a preemption for memory)."""
        if self._unreleased:
            with self._unreleased_lock:
                self._unreleased.difference_update(
                    piece.seq_id for piece in batch if piece.start_pos == 0 or piece.copy_from is not None
                )

    def _broken(self, error: BaseException) -> StageError:
        self._mark_down(f"the forward connection broke: {error}")
        return StageError(f"{self.connection.label} failed during a forward pass: {self._status_error}")

    def release(self, seq_ids: Sequence[int]) -> None:
        if not self._up:
            with self._unreleased_lock:
                self._unreleased.update(seq_ids)
            return
        try:
            self.connection.release(seq_ids)
        except ClusterError as error:  # up a moment ago: freed at the next ping the worker answers
            log.warning("%s", error)
            with self._unreleased_lock:
                self._unreleased.update(seq_ids)

    # ---- health ----
    def healthy(self) -> bool:
        return self._up

    def answers(self) -> bool:
        if not self._up:
            return False
        try:
            self.connection.info()
        except WorkerSilentError:
            self._missed()
            return False
        except ClusterError as error:
            self._mark_down(str(error))
            return False
        self._answered_at = time.monotonic()
        return True

    def _missed(self) -> None:
        """A ping went unanswered though the connection is open: down once the worker has been silent for
        SILENT_DOWN_S, a stall until then."""
        silent = time.monotonic() - self._answered_at
        if silent >= SILENT_DOWN_S:
            self._mark_down(
                f"it answered nothing for {silent:.0f} s (is it paused, overloaded, or is the network down?)"
            )
        elif not self._late:
            log.warning(
                "%s is late answering its ping: its requests wait; down if it stays silent for %.0f s",
                self.connection.label, SILENT_DOWN_S,
            )  # fmt: skip
        self._late = True

    def _lost_forward(self) -> str | None:
        """Why the forward waiting for this worker's answer is lost, if it is: sent over FORWARD_LOST_S ago, and the
        worker, answering its pings since, has worked on no forward for as long (one it works on now reads 0).
        Nothing else bounds that wait: a forward the worker dropped left the engine thread waiting for ever."""
        sent, now = self._sent_at, time.monotonic()
        if sent is None or now - sent < FORWARD_LOST_S or self._info_at <= sent:
            return None
        if self._worked_at >= now - FORWARD_LOST_S:
            return None
        return f"a forward sent {now - sent:.0f} s ago got no answer, and the worker has worked on none since"

    def _ping_timeout(self) -> float:
        """A ping's timeout: PING_TIMEOUT_S, cut to end when the worker will have been silent for SILENT_DOWN_S."""
        left = self._answered_at + SILENT_DOWN_S - time.monotonic()
        return min(PING_TIMEOUT_S, max(left, 0.05))

    def _mark_down(self, reason: str) -> None:
        if self._up:  # the first reason is the cause; later ones are its echoes (a cancelled stream, a closed socket)
            log.error("%s is down: %s", self.connection.label, reason)
            self._status_error = reason
        self._up = False
        self._drop_stream()

    def _watch(self) -> None:
        backoff = 0.5
        while not self._closing.wait((0.0 if self._late else PING_INTERVAL_S) if self._up else backoff):
            if self._up:
                try:
                    info = self._last_info = self.connection.info(self._ping_timeout())
                    self._info_at = self._answered_at = time.monotonic()
                    if self._late:
                        log.info("%s answers again", self.connection.label)
                    self._late = False
                    self._worked_at = self._info_at - info.forward_idle_seconds
                    held = (info.layers.start, info.layers.end) if info.HasField("layers") else None
                    if info.status != pb.WORKER_STATUS_READY:
                        status = pb.WorkerStatus.Name(info.status).removeprefix("WORKER_STATUS_").lower()
                        why = "another master is assigning it layers" if status == "loading" else "it lost its layers"
                        self._mark_down(f"worker is {status}: {why}")
                    elif (
                        held != (self.start, self.end)
                        or info.model_id != self.assignment.model_id
                        or (info.assignment and info.assignment != self.connection.assignment)
                    ):
                        # Someone else (another master) re-assigned it: its caches and maybe its layers are not ours.
                        self._mark_down(f"worker was re-assigned: it holds {info.model_id} {held}")
                    elif (lost := self._lost_forward()) is not None:
                        self._mark_down(lost)
                    else:
                        self._release_unreleased()
                except WorkerSilentError:
                    self._missed()
                except ClusterError as error:
                    self._mark_down(str(error))
                continue
            try:
                self._reconnect()
                backoff = 0.5
            except ClusterError as error:
                # Each new reason once (a key or TLS change, another master), not each figure in it ("in use 3 s ago")
                if _DIGITS.sub("#", str(error)) != _DIGITS.sub("#", self._status_error):
                    log.warning("%s is still down: %s", self.connection.label, error)
                self._status_error = str(error)
                backoff = min(backoff * 2, 5.0)

    def _release_unreleased(self) -> None:
        """Free the sequences a failed Release left on the worker (it answers again)."""
        with self._unreleased_lock:
            stale, self._unreleased = self._unreleased, set()
        if stale:
            try:
                self.connection.release(sorted(stale))
            except ClusterError:
                with self._unreleased_lock:
                    self._unreleased |= stale
                raise

    def _reconnect(self) -> None:
        reply = self.connection.handshake(timeout=PING_TIMEOUT_S)
        names = self.connection.names
        renamed = names.renamed(self.connection.spec, reply.host.worker_name) if names is not None else None
        if renamed is not None:  # restarted under another --name: shown under it, as a placement would show it
            log.info("%s is back as %r (its new --name)", self.connection.label, renamed.name)
            self.connection.spec, self.name = renamed, renamed.name
        layers = reply.layers if reply.HasField("layers") else None
        held = (layers.start, layers.end) if layers is not None else None
        if reply.assignment and reply.assignment == self.connection.assignment and held == (self.start, self.end):
            self._release_unreleased()  # it kept our layers and caches (a pause, a network cut)
        else:
            info = self.connection.info()
            if info.status == pb.WORKER_STATUS_LOADING:  # another master's Assign under way: never two at once
                raise ClusterError(f"{self.connection.label} is loading layers for another master")
            if reply.assignment:  # another master's layers (same model name or not: the number tells)
                idle = info.forward_idle_seconds  # counted from its Assign too: a fresh one is not idle
                if idle < TAKEOVER_IDLE_S:
                    raise ClusterError(
                        f"{self.connection.label} now serves another master ({reply.model_id} layers {held}, in use "
                        f"{idle:.0f} s ago); taken back once it has been idle for {TAKEOVER_IDLE_S:.0f} s"
                    )
            with self._unreleased_lock:
                self._unreleased = set()
            self.connection.assign(self.assignment)  # restarted, or abandoned: our weights, no caches from before
        self._last_info = self.connection.info()
        self._answered_at, self._late = time.monotonic(), False
        self._up, self._status_error = True, ""
        log.info("%s is back with layers %d-%d", self.connection.label, self.start, self.end - 1)

    def describe(self) -> dict[str, Any]:
        return describe_remote(self)

    @property
    def up(self) -> bool:
        return self._up

    @property
    def last_info(self) -> pb.InfoReply | None:
        """The last ping's answer (the worker's load and host facts then)."""
        return self._last_info

    @property
    def status_error(self) -> str:
        """Why the worker is down ("" while it is up)."""
        return self._status_error

    def close(self) -> None:
        """Stop using the worker and free its memory: it drops our layers (the weights stay in its disk cache)."""
        self._closing.set()
        # Let a ping in flight finish first: closing the channel under it would fail it with a non-gRPC error in the
        # monitor thread, and a monitor still running after close would reopen the channel.
        self._monitor.join(timeout=PING_TIMEOUT_S + 1.0)
        self._drop_stream()
        if self._up:
            try:
                self.connection.unassign()
            except ClusterError as error:  # it may be gone; a worker restarted holds nothing anyway
                log.warning("%s", error)
        self.connection.close()
