"""The worker's Forward: hidden states of a batch of sequences through its layers, on the fast path (a frame in,
a frame out, or passed on to the next worker of a chain) or a long-lived gRPC stream; what a request may not ask
(sequences it lacks, a copy of itself, another assignment) is answered as an error naming it. `Forwarding` is mixed
into the servicer (cake_py.rpc.server), which keeps the control calls."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import torch
from google.protobuf.message import DecodeError

from cake_py.errors import CakeError, ClusterError
from cake_py.models.device import release_openmp_threads
from cake_py.models.kv_cache import KVStore, SequenceSlice
from cake_py.models.llama import Transformer
from cake_py.rpc.codec import decode_tensor, encode_tensor
from cake_py.rpc.dataplane import DataPlaneServer
from cake_py.rpc.dataplane_client import PeerLinks
from cake_py.rpc.pb import worker_pb2 as pb

log = logging.getLogger(__name__)
MAX_CHAIN_HOPS = 256  # workers a chained forward may still pass through; a real cluster has a handful
MAX_STREAMS = 16  # Forward and Assign streams open at once; the server's pool has room for as many unary calls besides


class ForwardActivity:
    """Forward passes in progress and when the last one (or the last Assign) ended, for
    InfoReply.forward_idle_seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._since = time.monotonic()

    def begin(self) -> None:
        with self._lock:
            self._active += 1

    def end(self) -> None:
        with self._lock:
            self._active -= 1
            self._since = time.monotonic()

    def touch(self) -> None:
        """Count as work now (an Assign: the master that made it is about to use the worker)."""
        with self._lock:
            self._since = time.monotonic()

    def idle_seconds(self) -> float:
        """0 while a forward pass is in progress, else the seconds since the last one ended (never 0)."""
        with self._lock:
            return 0.0 if self._active else max(time.monotonic() - self._since, 1e-6)


class Forwarding:
    """Forward and its fast-path twin, over the servicer's layers and caches (its attributes, below)."""

    name: str
    device: str
    lock: threading.Lock
    streams: threading.BoundedSemaphore
    model: Transformer | None
    kv: KVStore | None
    model_id: str
    assignment: int
    compute_dtype: torch.dtype
    activity: ForwardActivity
    peers: PeerLinks
    dataplane: DataPlaneServer | None

    @contextmanager
    def _stream_slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        """A stream holds one of the server's threads while it is open: past MAX_STREAMS it is refused, so that
        streams left open (or never fed) cannot take the threads that Info, Handshake and Release need."""
        if not self.streams.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"worker {self.name!r} already has {MAX_STREAMS} streams (Forward, Assign) open; retry later",
            )
        try:
            yield
        finally:
            self.streams.release()

    def Forward(
        self, request_iterator: Iterator[pb.ForwardRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ForwardReply]:
        try:
            with self._stream_slot(context), torch.inference_mode():
                for request in request_iterator:
                    self.activity.begin()
                    try:
                        reply = self._forward_one(request)
                    finally:
                        self.activity.end()
                    yield reply
        finally:
            release_openmp_threads()  # the stream is over: its pool must not slow the next stream's

    def forward_frame(self, payload: bytes) -> bytes | None:
        """The fast path's handler: a serialized ForwardRequest in, the serialized ForwardReply to answer with, or
        None when a chained request was passed on or answered on the master's own connection."""
        try:
            request = pb.ForwardRequest.FromString(payload)
        except DecodeError:
            return pb.ForwardReply(error="malformed ForwardRequest").SerializeToString()
        reply_to = request.reply_session
        self.activity.begin()
        try:
            return self._forward_frame(request, reply_to)
        except Exception as error:  # the one seam: whatever went wrong must reach the master, which waits for it
            log.exception("forward %d failed", request.request_id)
            reply = pb.ForwardReply(
                request_id=request.request_id, error=f"worker {self.name!r} failed: {type(error).__name__}: {error}"
            )
            if not reply_to:
                return reply.SerializeToString()
            self._answer_session(reply_to, reply)
            return None
        finally:
            self.activity.end()

    def _forward_frame(self, request: pb.ForwardRequest, reply_to: bytes) -> bytes | None:
        reply = self._forward_one(request)  # the fast path's threads run in inference mode (see worker.py)
        if not reply_to:
            return reply.SerializeToString()
        request.chain_forward_us.append(reply.forward_us)
        if request.next and not reply.error:
            # The request goes on as it came, with this stage's output and one hop fewer: no new message to build.
            hop = request.next[0]
            host, port, name = hop.host, hop.data_port, hop.name
            request.reply_session = hop.session
            request.assignment = hop.assignment
            del request.next[0]
            request.hidden.data = reply.hidden.data
            try:
                self.peers.send(host, port, request.SerializeToString())
                return None
            except ClusterError as error:
                reply.chain_error = f"worker {self.name!r} cannot pass its output to {name!r}: {error}"
                log.warning("%s", reply.chain_error)
        reply.chain_forward_us.extend(request.chain_forward_us)
        self._answer_session(reply_to, reply)
        return None

    def _answer_session(self, session: bytes, reply: pb.ForwardReply) -> None:
        """Answer a chained forward on its master's own connection to this worker."""
        assert self.dataplane is not None  # chained requests only arrive on the fast path
        if not self.dataplane.send_to_session(session, reply.SerializeToString()):
            log.warning("chained forward %d: its master's connection is gone", reply.request_id)

    def _forward_one(self, request: pb.ForwardRequest) -> pb.ForwardReply:
        reply = pb.ForwardReply(request_id=request.request_id)
        try:
            batch = [
                SequenceSlice(s.seq_id, s.start_pos, s.n_tokens, s.copy_from or None, s.rope_end)
                for s in request.sequences
            ]
            hidden = decode_tensor(request.hidden)
            with self.lock:
                model, kv = self.model, self.kv
                if model is None or kv is None:
                    raise ClusterError(f"worker {self.name!r} has no layers assigned")
                if request.assignment and request.assignment != self.assignment:
                    raise ClusterError(
                        f"worker {self.name!r} was re-assigned since (another master?): it now holds "
                        f"{self.model_id} layers {model.start}-{model.end - 1}"
                    )
                if len(request.next) > MAX_CHAIN_HOPS:  # each hop re-sends the list: a long one costs quadratic bytes
                    raise ClusterError(f"a chain of {len(request.next)} more workers is over {MAX_CHAIN_HOPS}")
                if not batch or any(piece.n_tokens < 1 for piece in batch):
                    raise ClusterError("a forward needs sequences of at least one token each")
                width = model.config.hidden_size
                if hidden.ndim != 2 or hidden.shape[0] != sum(s.n_tokens for s in batch) or hidden.shape[1] != width:
                    raise ClusterError(
                        f"hidden states of shape {list(hidden.shape)} do not match the batch "
                        f"({sum(s.n_tokens for s in batch)} tokens of {width})"
                    )
                if not hidden.is_floating_point():
                    raise ClusterError(f"hidden states must be floating point, not {hidden.dtype}")
                if len({piece.seq_id for piece in batch}) != len(batch):
                    twice = next(p.seq_id for p in batch if sum(q.seq_id == p.seq_id for q in batch) > 1)
                    raise ClusterError(f"sequence {twice} appears twice in one forward")
                for piece in batch:
                    if piece.copy_from == piece.seq_id:  # the copy starts by clearing its target: its own cache
                        raise ClusterError(f"sequence {piece.seq_id} cannot start as a copy of itself")
                    if piece.copy_from is not None:
                        kv.check_copy(piece)  # ValueError naming both sequences
                    elif piece.start_pos > kv.length(piece.seq_id):  # earlier is fine: a failed step run again
                        raise ClusterError(
                            f"sequence {piece.seq_id} starts at {piece.start_pos} but this worker holds only "
                            f"{kv.length(piece.seq_id)} of its positions"
                        )
                # Each torch call costs tens of microseconds with caches cold from the layers: skip the no-op ones.
                same = hidden.dtype == self.compute_dtype and self.device == "cpu"
                began = time.perf_counter()
                out = model.forward_layers(hidden if same else hidden.to(self.device, self.compute_dtype), batch, kv)
                if out.is_cuda:  # the GPU's time, not only the launches' (encoding the answer waits for it anyway)
                    torch.cuda.synchronize(out.device)
                reply.forward_us = int((time.perf_counter() - began) * 1e6)
            encode_tensor(out if out.dtype == hidden.dtype else out.to(hidden.dtype), out=reply.hidden)
        except (CakeError, ValueError, RuntimeError) as error:
            reply.error = str(error)
        except Exception as error:  # a bug, not bad input: still an answer, not a dead stream or connection
            log.exception("forward %d failed", request.request_id)
            reply.error = f"worker {self.name!r} failed: {type(error).__name__}: {error}"
        return reply
