"""RemoteStage: layers [start, end) on a worker, behind the same protocol as LocalStage.

Hidden states take the forward fast path (cake_py.rpc.dataplane) when the worker offers one, else one long-lived
gRPC Forward stream; one message each way per step either way. A monitor thread pings the worker every second:
when it stops answering, the stage turns down (in-flight calls fail at once, /health turns 503), and the monitor
reconnects with backoff, re-assigning the layers (from the worker's disk cache) so the cluster serves again
without a restart.
"""

from __future__ import annotations

import itertools
import logging
import queue
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from cake_py.cluster.stage import StageStats
from cake_py.errors import ClusterError, StageError
from cake_py.models.kv_cache import Batch
from cake_py.rpc.codec import decode_tensor, encode_tensor
from cake_py.rpc.connection import PING_INTERVAL_S, PING_TIMEOUT_S, Assignment, WorkerConnection
from cake_py.rpc.dataplane import DataPlaneClient
from cake_py.rpc.pb import worker_pb2 as pb

__all__ = ["Assignment", "RemoteStage", "WorkerConnection"]

log = logging.getLogger(__name__)


class RemoteStage:
    """Layers [start, end) on a worker, behind the same protocol as LocalStage."""

    def __init__(self, connection: WorkerConnection, assignment: Assignment) -> None:
        self.connection = connection
        self.assignment = assignment
        self.name = connection.spec.name
        self.start, self.end = assignment.start, assignment.end
        self.stats = StageStats()
        self._up = True
        self._status_error = ""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the stream objects, not the engine (the only forward caller)
        self._outbox: queue.SimpleQueue[pb.ForwardRequest | None] | None = None
        self._call: Any = None
        self._fast: DataPlaneClient | None = None
        self._fast_failed = False  # this connection's fast path was tried and refused: use the gRPC stream
        self._closing = threading.Event()
        self._last_info: pb.InfoReply | None = None
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
        """The fast-path connection, opened on first use; None when the worker offers none or it failed."""
        if self._fast is None and not self._fast_failed and self.connection.data_port:
            host = self.connection.spec.address.rpartition(":")[0].strip("[]")
            client = DataPlaneClient(host, self.connection.data_port, self.connection.cluster_key, self.connection.tls)
            try:
                client.connect(timeout=PING_TIMEOUT_S)
            except ClusterError as error:
                self._fast_failed = True
                log.warning("%s: %s; using the gRPC Forward stream", self.connection.label, error)
                return None
            with self._lock:
                self._fast = client
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
            self._fast, self._fast_failed = None, False
            if self._outbox is not None:
                self._outbox.put(None)
            if self._call is not None:
                self._call.cancel()
            self._outbox, self._call = None, None

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self._up:
            raise StageError(f"{self.connection.label} is down: {self._status_error}")
        began = time.perf_counter()
        request = pb.ForwardRequest(
            request_id=next(self._ids),
            sequences=[pb.SequenceSlice(seq_id=s.seq_id, start_pos=s.start_pos, n_tokens=s.n_tokens) for s in batch],
        )
        encode_tensor(hidden, out=request.hidden)
        fast = self._fast_path()
        if fast is not None:
            try:
                reply = pb.ForwardReply.FromString(fast.exchange(request.SerializeToString()))
            except (OSError, ConnectionError, DecodeError) as error:
                self._mark_down(f"the forward connection broke: {error}")
                raise StageError(
                    f"{self.connection.label} failed during a forward pass: {self._status_error}"
                ) from None
        else:
            outbox, call = self._stream()
            outbox.put(request)
            try:
                reply = next(call)
            except (grpc.RpcError, StopIteration) as error:
                self._mark_down(str(error.details() if isinstance(error, grpc.Call) else "stream ended"))
                raise StageError(
                    f"{self.connection.label} failed during a forward pass: {self._status_error}"
                ) from None
        if reply.error:
            raise StageError(f"{self.connection.label}: {reply.error}")
        out = decode_tensor(reply.hidden)
        if hidden.device.type != "cpu":
            out = out.to(hidden.device)
        round_trip_ms = (time.perf_counter() - began) * 1000
        self.stats.record(reply.forward_us / 1000, round_trip_ms, len(request.hidden.data), len(reply.hidden.data))
        return out

    def release(self, seq_ids: Sequence[int]) -> None:
        if not self._up:
            with self._unreleased_lock:
                self._unreleased.update(seq_ids)
            return
        try:
            self.connection.release(seq_ids)
        except ClusterError as error:
            log.warning("%s", error)

    # ---- health ----
    def healthy(self) -> bool:
        return self._up

    def _mark_down(self, reason: str) -> None:
        if self._up:
            log.error("%s is down: %s", self.connection.label, reason)
        self._up, self._status_error = False, reason
        self._drop_stream()

    def _watch(self) -> None:
        backoff = 0.5
        while not self._closing.wait(PING_INTERVAL_S if self._up else backoff):
            if self._up:
                try:
                    info = self._last_info = self.connection.info()
                    held = (info.layers.start, info.layers.end) if info.HasField("layers") else None
                    if info.status != pb.WORKER_STATUS_READY:
                        self._mark_down(f"worker lost its layers (status {info.status})")
                    elif held != (self.start, self.end) or info.model_id != self.assignment.model_id:
                        # Someone else (another master) re-assigned it: forwarding would run the wrong layers.
                        self._mark_down(f"worker now holds other layers ({info.model_id} {held})")
                except ClusterError as error:
                    self._mark_down(str(error))
                continue
            try:
                self._reconnect()
                backoff = 0.5
            except ClusterError as error:
                self._status_error = str(error)
                backoff = min(backoff * 2, 5.0)

    def _reconnect(self) -> None:
        reply = self.connection.handshake(timeout=PING_TIMEOUT_S)
        layers = reply.layers if reply.HasField("layers") else None
        same = layers is not None and (layers.start, layers.end) == (self.start, self.end)
        with self._unreleased_lock:
            stale, self._unreleased = self._unreleased, set()
        if not same or reply.model_id != self.assignment.model_id:
            self.connection.assign(self.assignment)  # a fresh model: no caches left from before
        elif stale:
            try:
                self.connection.release(sorted(stale))
            except ClusterError:
                with self._unreleased_lock:
                    self._unreleased |= stale
                raise
        self._last_info = self.connection.info()
        self._up, self._status_error = True, ""
        log.info("%s is back with layers %d-%d", self.connection.label, self.start, self.end - 1)

    def describe(self) -> dict[str, Any]:
        host = self.connection.host
        info = self._last_info
        node: dict[str, Any] = {
            "local": False,
            "name": self.name,
            "host": self.connection.spec.address,
            "status": "up" if self._up else "down",
            "error": self._status_error or None,
            "forward_ms": round(self.stats.forward_ms, 3),
            "round_trip_ms": round(self.stats.round_trip_ms, 3),
            "hop_ms": round(max(self.stats.round_trip_ms - self.stats.forward_ms, 0.0), 3),
            "bytes_sent": self.stats.bytes_sent,
            "bytes_received": self.stats.bytes_received,
            "transport": self.transport,
        }
        if host is not None:
            node.update(
                description=f"{host.backend} {host.hostname}",
                device=host.device,
                backend=host.backend,
                hostname=host.hostname,
                os=host.os,
                vram_bytes=host.memory_total_bytes,
                memory_free_bytes=host.memory_free_bytes,
                tflops=host.tflops,
                threads=host.threads,
                torch_version=host.torch_version,
            )
        if info is not None:
            node.update(
                kv_cache_bytes=info.kv_cache_bytes,
                weights_bytes=info.weights_bytes,
                live_sequences=info.live_sequences,
                cpu_percent=info.cpu_percent,
                process_rss_bytes=info.process_rss_bytes,
                memory_used_bytes=info.host.memory_total_bytes - info.host.memory_free_bytes,
            )
        return node

    def close(self) -> None:
        self._closing.set()
        # Let a ping in flight finish first: closing the channel under it would fail it with a non-gRPC error in the
        # monitor thread, and a monitor still running after close would reopen the channel.
        self._monitor.join(timeout=PING_TIMEOUT_S + 1.0)
        self._drop_stream()
        self.connection.close()
