"""`cake worker`: the gRPC servicer that holds layers [start, end) of a model and their KV caches.

It needs no model files: the master sends the config and streams the weights once (verified, cached on disk by
content hash). Forward (cake_py.rpc.forward, mixed in) runs on the fast path (cake_py.rpc.dataplane) or a
long-lived bidirectional gRPC stream, one message each way per step; a chained forward is passed on to the next
worker instead of answered. Torch runs on the connection and handler threads, serialised by one lock so an Assign
never races a Forward.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import grpc
import psutil
import torch

from cake_py.cluster.hostinfo import HostFacts, host_facts
from cake_py.config import WorkerSettings
from cake_py.errors import CakeError, ClusterError
from cake_py.models.config import ModelConfig
from cake_py.models.device import held_device_memory, release_device_memory, release_openmp_threads
from cake_py.models.kv_cache import KVStore
from cake_py.models.llama import Transformer
from cake_py.models.weights import build_transformer
from cake_py.rpc import PROTOCOL_VERSION
from cake_py.rpc.codec import dtype_from_pb, dtype_to_pb
from cake_py.rpc.dataplane import DataPlaneServer
from cake_py.rpc.dataplane_client import PeerLinks, client_tls
from cake_py.rpc.forward import MAX_STREAMS, ForwardActivity, Forwarding
from cake_py.rpc.pb import worker_pb2 as pb
from cake_py.rpc.pb import worker_pb2_grpc as pb_grpc
from cake_py.rpc.weight_cache import TensorWriter, WeightCache

log = logging.getLogger(__name__)


class WorkerServicer(Forwarding, pb_grpc.WorkerServicer):
    def __init__(self, settings: WorkerSettings, device: str, tflops: float) -> None:
        self.settings = settings
        self.device = device
        self.tflops = tflops
        self.name = settings.name or f"{os.uname().nodename}:{settings.port}"
        self.last_master: str | None = None  # who handshook last: a master probing every few seconds is logged once
        self.cache = WeightCache(settings.cache_dir, settings.cache_max_bytes)
        self.lock = threading.Lock()
        self._assigning = threading.Lock()  # held through an Assign: never two at once
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.model: Transformer | None = None
        self.kv: KVStore | None = None
        self.model_id = ""
        self.assignment = 0  # changes with every Assign (random, so never the same across restarts); 0: none yet
        self.compute_dtype = torch.bfloat16
        self.status = pb.WORKER_STATUS_IDLE
        self.error = ""
        self.weights_bytes = 0
        self.started = time.time()
        self.dataplane: DataPlaneServer | None = None
        # To the next workers of chained forwards: a TLS worker's peers are TLS workers of the same cluster.
        tls = client_tls(settings.tls_cert, settings.tls_key, settings.tls_ca) if settings.tls_cert else None
        self.peers = PeerLinks(settings.cluster_key, tls)
        self.process = psutil.Process()
        self.activity = ForwardActivity()

    # ---- host facts ----
    def _host(self) -> pb.HostInfo:
        facts: HostFacts = host_facts(self.device, self.tflops)
        values = facts.as_dict()
        values["worker_name"] = self.name
        return pb.HostInfo(**{k: v for k, v in values.items() if k in pb.HostInfo.DESCRIPTOR.fields_by_name})

    def _layers(self) -> pb.LayerRange | None:
        return pb.LayerRange(start=self.model.start, end=self.model.end) if self.model is not None else None

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeReply:
        if request.protocol_version != PROTOCOL_VERSION:
            log.warning(
                "refused a master at %s speaking protocol %d (this worker speaks %d): run the same cake_py version",
                context.peer(), request.protocol_version, PROTOCOL_VERSION,
            )  # fmt: skip
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not this worker's {PROTOCOL_VERSION}: "
                "run the same cake_py version on master and workers",
            )
        master = request.master_name or context.peer()
        log.log(logging.DEBUG if master == self.last_master else logging.INFO, "handshake from master %r", master)
        self.last_master = master
        host = self._host()
        # Placement follows: the memory this worker's current layers and caches hold is freed by the next Assign,
        # so a master that restarts places the model on the same memory as before.
        kv = self.kv
        held = self.weights_bytes + (kv.nbytes if kv is not None else 0)
        if self.model is not None:  # on a GPU, what its allocator reserves: activations' blocks too
            held = max(held, held_device_memory(self.device))
        host.memory_free_bytes = min(host.memory_total_bytes, host.memory_free_bytes + held)
        return pb.HandshakeReply(
            protocol_version=PROTOCOL_VERSION,
            host=host,
            model_id=self.model_id,
            layers=self._layers(),
            data_port=self.dataplane.port if self.dataplane is not None else 0,
            assignment=self.assignment,
            held_bytes=held,
        )

    def Prepare(self, request: pb.PrepareRequest, context: grpc.ServicerContext) -> pb.PrepareReply:
        missing: dict[str, int] = {}  # sha256 → bytes to stream
        cached = 0
        try:
            self.cache.ensure_folder()
            for spec in request.tensors:
                if self.cache.verify(spec.sha256, spec.size_bytes):
                    self.cache.touch(spec.sha256)  # in use again: the last to be evicted
                    cached += spec.size_bytes
                else:
                    missing[spec.sha256] = spec.size_bytes
        except ClusterError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:  # room on the disk; under --cache-max-gb, the weights unused the longest make room for the missing ones
            sizes = {spec.sha256: spec.size_bytes for spec in request.tensors}
            self.cache.reserve(sizes, sum(missing.values()), self.cache.free_bytes())
        except ClusterError as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        return pb.PrepareReply(missing_sha256=list(missing), cached_bytes=cached)

    def Assign(self, request_iterator: Iterator[pb.AssignChunk], context: grpc.ServicerContext) -> pb.AssignReply:
        with self._stream_slot(context):
            # One at a time: two masters starting together both heard "assigned", and one found its stage down a
            # second later (the other's load replaced its layers). The second is refused, and says why.
            if not self._assigning.acquire(blocking=False):
                context.abort(
                    grpc.StatusCode.ABORTED,
                    "this worker is loading layers for another assignment right now (another master using it?): "
                    "retry once it is done, or give each master workers of its own",
                )
            try:
                return self._assign(request_iterator, context)
            finally:
                self._assigning.release()

    def _assign(self, request_iterator: Iterator[pb.AssignChunk], context: grpc.ServicerContext) -> pb.AssignReply:
        began = time.perf_counter()
        writers: dict[str, TensorWriter] = {}
        pinned: list[str] = []
        request_iterator = stream = IdleLimitedStream(request_iterator, context, self.settings.assign_idle_seconds)
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("payload") != "header":
                raise ClusterError("Assign must start with a header")
            header = first.header
            config = ModelConfig.from_hf(json.loads(header.config_json))
            start, end = header.layers.start, header.layers.end
            if not 0 <= start < end <= config.n_layers:
                raise ClusterError(f"layers [{start}, {end}) are outside the model's {config.n_layers} layers")
            dtype = dtype_from_pb(header.compute_dtype)
            if not dtype.is_floating_point:  # checked now: a failure after the stream would cost the old layers
                raise ClusterError(f"compute dtype {dtype} is not a floating-point type")
            specs = {spec.name: spec for spec in header.tensors}
            for announced in specs.values():
                _check_spec(announced)
            _check_buildable(config, specs, start, end, dtype)
            pinned = [spec.sha256 for spec in header.tensors]
            # What Prepare reserved stays reserved however long the stream takes.
            self.cache.hold({spec.sha256: spec.size_bytes for spec in header.tensors})
            received = 0
            self.status = pb.WORKER_STATUS_LOADING
            for message in request_iterator:
                chunk = message.chunk
                spec = specs.get(chunk.name)
                if spec is None:
                    raise ClusterError(f"weight chunk for {chunk.name!r}, which the header does not list")
                writer = writers.get(spec.sha256)
                if writer is None:
                    writer = writers[spec.sha256] = self.cache.writer(spec.sha256, spec.size_bytes)
                writer.write(chunk.offset, chunk.data)
                received += len(chunk.data)
                if writer.complete:
                    writer.commit()
            incomplete = [sha for sha, w in writers.items() if not w.complete]
            if incomplete:
                raise ClusterError(f"weight stream ended with {len(incomplete)} tensor(s) incomplete")
            with self.lock:  # free the old layers before loading the new ones: memory for one set, not both
                self.model, self.kv, self.weights_bytes, self.model_id, self.assignment = None, None, 0, "", 0
            release_device_memory(self.device)
            tensors = {}
            for name, spec in specs.items():
                # verify, not a size check: free when Prepare hashed it in this process, and it may not have
                if not self.cache.verify(spec.sha256, spec.size_bytes):
                    raise ClusterError(f"tensor {name!r} was neither streamed nor in the cache")
                tensors[name] = self.cache.load(spec.sha256, dtype_from_pb(spec.dtype), tuple(spec.shape))
            with self.lock:
                model = build_transformer(
                    config, tensors, start, end, with_embedding=False, with_head=False, dtype=dtype, device=self.device
                )
                self.model, self.kv = model, model.new_kv_store()
                release_openmp_threads()  # this handler thread is done with torch; Forward's must own the pool
                self.model_id, self.compute_dtype = header.model_id, dtype
                self.assignment = int.from_bytes(os.urandom(8), "little") | 1
                self.activity.touch()  # a fresh assignment is not an idle worker another master may take
                # Buffers too: 4-bit layers keep their packed weights and scales as buffers.
                self.weights_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
                self.status, self.error = pb.WORKER_STATUS_READY, ""
            total = sum(spec.size_bytes for spec in specs.values())
            log.info(
                "assigned %s layers %d-%d: %.1f MB received, %.1f MB from cache",
                header.model_id, start, end - 1, received / 1e6, (total - received) / 1e6,
            )  # fmt: skip
            return pb.AssignReply(
                layers=pb.LayerRange(start=start, end=end),
                received_bytes=received,
                reused_bytes=max(total - received, 0),
                n_tensors=len(specs),
                load_ms=int((time.perf_counter() - began) * 1000),
                assignment=self.assignment,
            )
        # RuntimeError, OverflowError, RecursionError: torch refusing a dtype or a size the header asked for, a
        # config nested too deeply for json: bad input all the same, named, not a gRPC UNKNOWN with a traceback.
        except (CakeError, ValueError, KeyError, RuntimeError, OverflowError, RecursionError) as error:
            self._assignment_failed(writers, str(error))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"assignment failed: {error}")
            raise  # unreachable: abort raises
        except OSError as error:  # the cache's disk: full, read-only, gone
            reason = f"cannot write the weight cache {str(self.cache.root)!r}: {error.strerror or error}"
            self._assignment_failed(writers, reason)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"assignment failed: {reason}")
            raise  # unreachable: abort raises
        except BaseException as error:  # the master cancelled, the disk filled, memory ran out: never stuck LOADING
            # The stream's own error says nothing (an empty RpcError): name what happened instead.
            cut = isinstance(error, grpc.RpcError) and not str(error)
            reason = "the master cancelled the stream or its connection broke" if cut else ""
            reason = reason or f"{type(error).__name__}: {error}"
            self._assignment_failed(writers, reason)
            raise
        finally:
            stream.close()
            self.cache.release(pinned)  # what Prepare kept from eviction for it may go again

    def _assignment_failed(self, writers: dict[str, TensorWriter], reason: str) -> None:
        """Drop the partial files of an assignment that did not finish; the worker is READY again if it still
        holds its previous layers (the failure came before they were freed), else FAILED."""
        for writer in writers.values():
            writer.abort()  # committed ones have no temp file left; any other (a failed flush too) is removed
        log.error("assignment failed: %s", reason)
        with self.lock:
            if self.model is not None:
                self.status = pb.WORKER_STATUS_READY
            else:
                self.status, self.error = pb.WORKER_STATUS_FAILED, reason
        release_device_memory(self.device)  # what the failed load placed: free again for the master's retry

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseReply:
        with self.lock:
            if self.kv is None or (request.assignment and request.assignment != self.assignment):
                return pb.ReleaseReply(released=0)
            live = set(self.kv.sequence_ids())
            ids = [i for i in request.seq_ids if i in live]
            self.kv.release(ids)
        return pb.ReleaseReply(released=len(ids))

    def Unassign(self, request: pb.UnassignRequest, context: grpc.ServicerContext) -> pb.UnassignReply:
        with self.lock:
            if not request.assignment or request.assignment != self.assignment:
                return pb.UnassignReply(dropped=False)
            self.model, self.kv, self.weights_bytes, self.model_id, self.assignment = None, None, 0, "", 0
            self.status, self.error = pb.WORKER_STATUS_IDLE, ""
        release_device_memory(self.device)  # a GPU's free memory counts them again (placement reads it)
        log.info("layers dropped: their master unloaded its model or shut down")
        return pb.UnassignReply(dropped=True)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoReply:
        kv = self.kv
        return pb.InfoReply(
            status=self.status,
            host=self._host(),
            model_id=self.model_id,
            layers=self._layers(),
            compute_dtype=cast(Any, dtype_to_pb(self.compute_dtype)),  # the stubs type enum fields as DType
            live_sequences=len(kv.sequence_ids()) if kv else 0,
            kv_cache_bytes=kv.nbytes if kv else 0,
            weights_bytes=self.weights_bytes,
            uptime_seconds=time.time() - self.started,
            cpu_percent=self.process.cpu_percent(),
            process_rss_bytes=self.process.memory_info().rss,
            error=self.error,
            protocol_version=PROTOCOL_VERSION,
            forward_idle_seconds=self.activity.idle_seconds(),
            assignment=self.assignment,
        )


class IdleLimitedStream:
    """A master's Assign stream, given up (ClusterError) once the next message has not come for `seconds`.

    gRPC's request iterator waits with no timeout, and the master's call runs for up to an hour: a master frozen
    mid-stream (SIGSTOP, a host that hangs) held the worker's one Assign all that time, every other master refused
    meanwhile. A watcher cancels the call instead, which ends the wait; a message that comes after it gave up is
    not taken."""

    def __init__(self, messages: Iterator[pb.AssignChunk], context: grpc.ServicerContext, seconds: float) -> None:
        self.messages = messages
        self.context = context
        self.seconds = seconds
        self.lock = threading.Lock()
        self.waiting_since: float | None = None  # while the reader waits for the next message
        self.gave_up = False
        self.done = threading.Event()
        threading.Thread(target=self._watch, name="cake-assign-idle", daemon=True).start()

    def _watch(self) -> None:
        while not self.done.wait(min(self.seconds / 4, 1.0)):
            with self.lock:
                since = self.waiting_since
                if since is None or time.monotonic() - since < self.seconds:
                    continue
                self.gave_up = True
            self.context.cancel()
            return

    def __iter__(self) -> IdleLimitedStream:
        return self

    def __next__(self) -> pb.AssignChunk:
        with self.lock:
            self.waiting_since = time.monotonic()
        try:
            message = next(self.messages)
        except StopIteration:
            # A cancelled call may end its iterator as if the master had sent everything: it did not.
            if self.gave_up:
                raise self._given_up() from None
            if not self.context.is_active():
                raise ClusterError("the master cancelled the stream or its connection broke") from None
            raise
        except grpc.RpcError:
            if self.gave_up:  # the cancel's own error says nothing: say why
                raise self._given_up() from None
            raise
        finally:
            with self.lock:
                self.waiting_since = None
        if self.gave_up:
            raise self._given_up()
        return message

    def _given_up(self) -> ClusterError:
        return ClusterError(
            f"the master sent nothing for {self.seconds:.0f} s (frozen, or its host or network gone?): "
            "given up so that other masters can assign this worker"
        )

    def close(self) -> None:
        self.done.set()


def _check_buildable(
    config: ModelConfig, specs: dict[str, pb.TensorSpec], start: int, end: int, dtype: torch.dtype
) -> None:
    """Build the layers on the meta device from the announced shapes (no memory, no data): sizes torch refuses
    and tensors that do not fit the config are found now, before the old layers are freed for the real load."""
    try:
        shapes = {
            name: torch.empty(tuple(s.shape), dtype=dtype_from_pb(s.dtype), device="meta") for name, s in specs.items()
        }
        build_transformer(config, shapes, start, end, with_embedding=False, with_head=False, dtype=dtype, device="meta")
    except (CakeError, RuntimeError, ValueError) as error:
        raise ClusterError(f"the announced layers cannot be built: {error}") from error


def _check_spec(spec: pb.TensorSpec) -> None:
    """A tensor the header announces must fit in the bytes it announces for it (its file is mapped by that shape)."""
    wanted = math.prod(spec.shape) * dtype_from_pb(spec.dtype).itemsize
    if wanted > spec.size_bytes:  # dims are unsigned on the wire
        raise ClusterError(
            f"tensor {spec.name!r}: shape {list(spec.shape)} does not fit in its {spec.size_bytes} bytes"
        )
