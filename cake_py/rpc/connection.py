"""The master's connection to one worker: handshake, status, release, and layer assignment with weight streaming.

Every call carries the cluster key; errors name the worker and say what it was doing. Weights cross once: the
master sends a sha256 manifest, the worker answers what its disk cache lacks, and only that is streamed.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from cake_py.cluster.names import WorkerNames
from cake_py.config import WorkerSpec
from cake_py.errors import ClusterError, WorkerSilentError
from cake_py.models.weights import LAYER_PATTERN, WeightSource, load_stage_tensors
from cake_py.rpc import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, WEIGHT_CHUNK_BYTES
from cake_py.rpc.codec import dtype_to_pb
from cake_py.rpc.first_contact import knock, tls_probe
from cake_py.rpc.pb import worker_pb2 as pb
from cake_py.rpc.pb import worker_pb2_grpc as pb_grpc
from cake_py.rpc.security import key_metadata

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
HANDSHAKE_TIMEOUT_S = 10.0
PROGRESS_EVERY_S = 10.0  # a line on the master's log this often while weights stream to a worker
VERIFY_BYTES_PER_S = 50e6  # the slowest rate a worker may hash its cached weights at (an old disk, no SHA units)
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 1.5
# Release runs on the engine thread, between steps: a hung worker may hold every stream up this long before the
# ids wait for the health monitor instead (it marks the worker down once it has been silent for client.SILENT_DOWN_S).
RELEASE_TIMEOUT_S = 1.5
# A worker that another master re-assigned is taken back only once that master has left it idle this long.
TAKEOVER_IDLE_S = 60.0
# A worker that answers no ping this long while it verifies or receives its layers is hung (paused, frozen): the
# Prepare or Assign is given up. Without this, only gRPC's keepalive noticed, after about 70 s (a stalled stream
# fills the socket's buffers, and the keepalive pings wait behind them), the Prepare's own deadline after 60 s.
ASSIGN_STALL_S = 10.0


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.nbytes) if tensor.numel() else b""


@dataclass(frozen=True)
class Assignment:
    """What a worker must hold: a model's layers [start, end) computed in `dtype`."""

    model_id: str
    config_json: str
    source: WeightSource
    start: int
    end: int
    dtype: torch.dtype

    def names_by_layer(self) -> Iterator[tuple[int, list[str]]]:
        """Each layer of the range, in order, with the names of its tensors in the source."""
        by_layer: dict[int, list[str]] = {}
        for name in self.source.names():
            match = LAYER_PATTERN.match(name)
            if match and self.start <= int(match.group(1)) < self.end:
                by_layer.setdefault(int(match.group(1)), []).append(name)
        for layer in sorted(by_layer):
            yield layer, by_layer[layer]

    def tensors(self, layers: set[int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The range's tensors in the compute dtype, one layer in memory at a time (only those of `layers`: all for
        None)."""
        for layer, names in self.names_by_layer():
            if layers is not None and layer not in layers:
                continue
            loaded = load_stage_tensors(self.source, names, self.dtype)
            yield from loaded.items()


def _layers_of(digests: set[str], specs: list[pb.TensorSpec]) -> set[int] | None:
    """The layers holding a tensor of `digests`; None (every layer) where one is outside the layers."""
    layers = set()
    for spec in specs:
        if spec.sha256 in digests:
            match = LAYER_PATTERN.match(spec.name)
            if match is None:
                return None
            layers.add(int(match.group(1)))
    return layers


class WorkerConnection:
    """A channel to one worker, with the cluster key on every call; errors name the worker."""

    def __init__(
        self,
        spec: WorkerSpec,
        cluster_key: str | None,
        credentials: grpc.ChannelCredentials | None,
        master_name: str = "master",
        *,
        tls: ssl.SSLContext | None = None,
        names: WorkerNames | None = None,
    ) -> None:
        self.configured = spec
        self.names = names  # the master's: `spec` is shown under the name it has there
        self.spec = names.shown(spec) if names is not None else spec
        self.cluster_key = cluster_key
        self.tls = tls  # for the forward fast path; gRPC has its own `credentials`
        self.data_port = 0
        self.metadata = key_metadata(cluster_key)
        self.credentials = credentials
        self.master_name = master_name
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.WorkerStub | None = None
        self.host: pb.HostInfo | None = None
        self.assignment = 0  # the number of our last Assign on this worker (0: none, or dropped by unassign)
        self._handshake_timeout = HANDSHAKE_TIMEOUT_S  # the last handshake's, for what its failure says
        self._diagnose = True  # whether a failed first handshake looks at the port itself to say why (a knock)
        self._manifest: list[pb.TensorSpec] | None = None

    @property
    def label(self) -> str:
        return f"worker {self.spec.name!r} at {self.spec.address}"

    def _open(self) -> pb_grpc.WorkerStub:
        if self.stub is None:
            if self.credentials is not None:
                self.channel = grpc.secure_channel(self.spec.address, self.credentials, options=CHANNEL_OPTIONS)
            else:
                self.channel = grpc.insecure_channel(self.spec.address, options=CHANNEL_OPTIONS)
            self.stub = pb_grpc.WorkerStub(self.channel)
        return self.stub

    def _watchdog(self) -> tuple[grpc.Channel, pb_grpc.WorkerStub]:
        """A channel of its own (its own TCP connection: a stalled Assign stream may fill the shared one's buffers)
        for the pings that tell a hung worker from a slow one."""
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        if self.credentials is not None:
            channel = grpc.secure_channel(self.spec.address, self.credentials, options=options)
        else:
            channel = grpc.insecure_channel(self.spec.address, options=options)
        return channel, pb_grpc.WorkerStub(channel)

    def _await(self, call: Any, doing: str, progress: list[float] | None = None) -> Any:
        """The result of a long call (Prepare, Assign), given up once the worker has answered no ping for
        ASSIGN_STALL_S and (`progress`: when the worker last took a chunk of the stream) read nothing either: a link
        whose buffers the stream keeps full may delay the pings of a worker that is alive and reading. gRPC errors
        are raised as they are."""
        channel, stub = self._watchdog()
        try:
            answered = time.monotonic()
            while True:
                try:
                    return call.result(timeout=PING_INTERVAL_S)
                except grpc.FutureTimeoutError:
                    pass
                try:
                    stub.Info(pb.InfoRequest(), timeout=PING_TIMEOUT_S, metadata=self.metadata)
                    answered = time.monotonic()
                except grpc.RpcError:
                    answered = max(answered, progress[0] if progress else 0.0)
                    if time.monotonic() - answered >= ASSIGN_STALL_S:
                        call.cancel()
                        raise ClusterError(
                            f"{self.label} stopped answering while {doing} (no answer for {ASSIGN_STALL_S:.0f} s: "
                            "is it paused, hung, or is the network down?)"
                        ) from None
        finally:
            channel.close()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel, self.stub = None, None

    def error(self, error: grpc.RpcError, doing: str) -> ClusterError:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ClusterError(f"{self.label} refused our cluster key: give master and worker the same --cluster-key")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            kind = WorkerSilentError if code == grpc.StatusCode.DEADLINE_EXCEEDED else ClusterError
            if doing == "handshaking" and self.host is None and self._diagnose:
                return kind(self._first_contact_error(details))
            return kind(f"{self.label} is unreachable ({doing}): {details}{self._first_contact_hint(doing)}")
        return ClusterError(f"{self.label} failed while {doing}: {details}")

    def _first_contact_error(self, details: str) -> str:
        """What a first handshake that failed ran into. gRPC says "Deadline Exceeded" alike for a port where nothing
        listens, a worker that is paused, and a TLS mismatch (it retries each until the deadline): a look of our own
        at the port tells them apart."""
        unreachable = f"{self.label} is unreachable (handshaking)"
        found = knock(self.spec.address)
        if found == "refused":
            return f"{unreachable}: nothing listens there (connection refused): is `cake worker` running, on that port?"
        if found == "silent":
            return (
                f"{unreachable}: it accepted the connection but answered nothing within "
                f"{self._handshake_timeout:g} s (is it paused or overloaded, or is it not `cake worker`?)"
            )
        if found == "plaintext" and self.credentials is not None:
            return (
                f"{unreachable}: it answers without TLS and this master speaks TLS (--tls-ca): start the worker with "
                "TLS (--tls-cert/--tls-key), or the master without --tls-ca"
            )
        if found.startswith("no connection"):
            return f"{unreachable}: {found} (is the host up and the address right, or does a firewall drop it?)"
        return f"{unreachable}: {details}{self._first_contact_hint('handshaking')}"

    def _first_contact_hint(self, doing: str) -> str:
        # A TLS mismatch looks like an unreachable worker from here: gRPC just retries the failed TLS handshakes.
        if doing != "handshaking":
            return ""
        if self.host is not None:  # it answered before, with these settings: not a TLS or address mistake
            return "; it answered before (is it paused, overloaded, restarting, or is the network down?)"
        if self.credentials is None:
            return "; is `cake worker` running there, without TLS? (a TLS worker needs --tls-ca on the master)"
        hint = "; is `cake worker` running there with TLS, and is its certificate signed by --tls-ca for this address?"
        return hint + (tls_probe(self.spec.address, self.tls) if self.tls is not None else "")

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT_S, *, diagnose: bool = True) -> pb.HandshakeReply:
        """The worker's facts and protocol version. A first one that fails says why, from a look of its own at the
        port (up to KNOCK_TIMEOUT_S more) unless `diagnose` is off: a probe repeated every second (a dashboard's) has
        no time for that."""
        stub = self._open()
        self._handshake_timeout, self._diagnose = timeout, diagnose
        try:
            reply = stub.Handshake(
                pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, master_name=self.master_name),
                timeout=timeout,
                metadata=self.metadata,
                wait_for_ready=True,
            )
        except grpc.RpcError as error:
            raise self.error(error, "handshaking") from None
        if reply.protocol_version != PROTOCOL_VERSION:
            raise ClusterError(f"{self.label} speaks protocol {reply.protocol_version}, we speak {PROTOCOL_VERSION}")
        self.host = reply.host
        self.data_port = reply.data_port
        # `assignment` stays the number of OUR last Assign: the worker's current one (reply.assignment) may be
        # another master's, whose layers and caches a forward must never run on.
        return reply

    def info(self, timeout: float = PING_TIMEOUT_S) -> pb.InfoReply:
        try:
            return self._open().Info(pb.InfoRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise self.error(error, "reporting its status") from None

    def release(self, seq_ids: Sequence[int]) -> None:
        try:
            request = pb.ReleaseRequest(seq_ids=list(seq_ids), assignment=self.assignment)
            self._open().Release(request, timeout=RELEASE_TIMEOUT_S, metadata=self.metadata)
        except grpc.RpcError as error:
            raise self.error(error, "releasing sequences") from None

    def unassign(self, timeout: float = RELEASE_TIMEOUT_S) -> None:
        """Ask the worker to drop our layers (if it still holds them); ClusterError when it does not answer."""
        if not self.assignment:
            return
        try:
            self._open().Unassign(
                pb.UnassignRequest(assignment=self.assignment), timeout=timeout, metadata=self.metadata
            )
        except grpc.RpcError as error:
            raise self.error(error, "dropping its layers") from None
        self.assignment = 0

    def manifest(self, assignment: Assignment) -> list[pb.TensorSpec]:
        """Name, dtype, shape and sha256 of every tensor of the assignment (computed once, then reused)."""
        if self._manifest is None:
            specs = []
            for name, tensor in assignment.tensors():
                data = _raw_bytes(tensor)
                specs.append(
                    pb.TensorSpec(
                        name=name,
                        dtype=dtype_to_pb(tensor.dtype),  # type: ignore[arg-type]
                        shape=list(tensor.shape),
                        sha256=hashlib.sha256(data).hexdigest(),
                        size_bytes=len(data),
                    )
                )
            self._manifest = specs
        return self._manifest

    def assign(self, assignment: Assignment) -> pb.AssignReply:
        """Send the layer range; only tensors missing from the worker's cache cross the wire."""
        stub = self._open()
        specs = self.manifest(assignment)
        layers = f"layers {assignment.start}-{assignment.end - 1}"
        # The worker hashes every cached tensor it has: give it time for a large model on a slow disk.
        total = sum(spec.size_bytes for spec in specs)
        try:
            prepared = self._await(
                stub.Prepare.future(
                    pb.PrepareRequest(model_id=assignment.model_id, tensors=specs),
                    timeout=max(60.0, total / VERIFY_BYTES_PER_S),
                    metadata=self.metadata,
                ),
                f"verifying its weight cache for {layers}",
            )
        except grpc.RpcError as error:
            raise self.error(error, f"verifying its weight cache for {layers}") from None
        try:
            missing = set(prepared.missing_sha256)
            header = pb.AssignHeader(
                model_id=assignment.model_id,
                config_json=assignment.config_json,
                layers=pb.LayerRange(start=assignment.start, end=assignment.end),
                compute_dtype=dtype_to_pb(assignment.dtype),  # type: ignore[arg-type]
                tensors=specs,
            )
            digests = {spec.name: spec.sha256 for spec in specs}
            to_send = sum({spec.sha256: spec.size_bytes for spec in specs if spec.sha256 in missing}.values())
            if to_send:  # a large model streams for minutes: say so, and how far it is (chunks, below)
                log.info(
                    "%s: streaming %.1f MB of weights for %s (%.1f MB are in its cache)",
                    self.label, to_send / 1e6, layers, (total - to_send) / 1e6,
                )  # fmt: skip

            progress = [time.monotonic()]  # gRPC asks for the next chunk once the worker has taken the ones before

            def chunks() -> Iterator[pb.AssignChunk]:
                yield pb.AssignChunk(header=header)
                sent: set[str] = set()
                if not missing:
                    return
                streamed, report_at = 0, time.monotonic() + PROGRESS_EVERY_S
                # Layers whose tensors the worker has are not loaded again: loading them sent nothing for as long,
                # and a worker gives up an Assign that sends nothing for --assign-idle-seconds (a failover growing a
                # worker's range by a few layers of a large model would load its many cached ones first).
                for name, tensor in assignment.tensors(_layers_of(missing, specs)):
                    digest = digests[name]
                    if digest not in missing or digest in sent:
                        continue
                    sent.add(digest)
                    data = memoryview(_raw_bytes(tensor))
                    for offset in range(0, len(data), WEIGHT_CHUNK_BYTES):
                        piece = data[offset : offset + WEIGHT_CHUNK_BYTES]
                        yield pb.AssignChunk(chunk=pb.TensorChunk(name=name, offset=offset, data=bytes(piece)))
                        progress[0] = time.monotonic()
                        streamed += len(piece)
                        if time.monotonic() >= report_at:
                            report_at = time.monotonic() + PROGRESS_EVERY_S
                            log.info(
                                "%s: %.1f of %.1f MB streamed (%d%%)",
                                self.label, streamed / 1e6, to_send / 1e6, 100 * streamed // to_send,
                            )  # fmt: skip

            call = stub.Assign.future(chunks(), timeout=3600, metadata=self.metadata)
            reply = self._await(call, f"loading {layers}", progress)
            self.assignment = reply.assignment
            return reply
        except grpc.RpcError as error:
            raise self.error(error, f"loading {layers}") from None
