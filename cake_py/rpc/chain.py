"""Chained forward: the master sends a step's hidden states to the first worker of a run of stages on the fast
path, each worker passes its output straight to the next, and the last answers (one handoff per stage instead of a
round trip to the master each). Any worker of the chain may answer instead, with an error or a broken link.
"""

from __future__ import annotations

import itertools
import logging
import math
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from google.protobuf.message import DecodeError

from cake_py.errors import StageError
from cake_py.models.kv_cache import Batch
from cake_py.rpc.codec import decode_tensor, encode_tensor
from cake_py.rpc.connection import PING_INTERVAL_S
from cake_py.rpc.dataplane import read_frame
from cake_py.rpc.pb import worker_pb2 as pb

if TYPE_CHECKING:
    from cake_py.rpc.client import RemoteStage
    from cake_py.rpc.dataplane_client import DataPlaneClient

log = logging.getLogger(__name__)

# The master's own layers run on a piece of a pipelined step: (hidden, the piece's batch) → hidden.
PieceStep = Callable[[torch.Tensor, Batch], torch.Tensor]

# One sequence for every stage of the process: a late answer to a failed step can never match a newer request.
REQUEST_IDS = itertools.count(1)

# A chained forward that no worker of its chain has worked on for this long was lost on the way (a worker's
# connection thread died with it, say): the step fails instead of waiting forever.
CHAIN_STALL_S = 30.0

# How often a reader of pipelined pieces looks whether the thread sending them stopped (done, or failed).
WRITER_POLL_S = 0.05


def on_device_of(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A decoded (CPU) tensor moved to the device of `like`; no torch call when that is the CPU (the hot path)."""
    return tensor if like.device.type == "cpu" else tensor.to(like.device)


def _stalled(chain: Sequence[RemoteStage], sent_at: float) -> bool:
    """Whether every worker of the chain, asked since the forward was sent, has worked on no forward for
    CHAIN_STALL_S (a worker working now, or too old to say, answers 0 and never looks idle)."""
    now = time.monotonic()
    quiet_since = now - CHAIN_STALL_S
    return sent_at < quiet_since and all(s._info_at > sent_at and s._worked_at < quiet_since for s in chain)


def wire_slices(batch: Batch) -> list[pb.SequenceSlice]:
    return [
        pb.SequenceSlice(
            seq_id=s.seq_id, start_pos=s.start_pos, n_tokens=s.n_tokens, copy_from=s.copy_from or 0, rope_end=s.rope_end
        )
        for s in batch
    ]


def _clients(chain: Sequence[RemoteStage]) -> list[DataPlaneClient] | None:
    """Each stage's fast-path connection; None when one is gone (the stage went down since it was seen chainable)."""
    clients = []
    for stage in chain:
        client = stage._fast
        if client is None or not stage._up:
            return None
        clients.append(client)
    return clients


def _request(
    chain: Sequence[RemoteStage],
    clients: Sequence[DataPlaneClient],
    hidden: torch.Tensor,
    batch: Batch,
    request_id: int,
) -> pb.ForwardRequest:
    request = pb.ForwardRequest(
        request_id=request_id,
        sequences=wire_slices(batch),
        next=[
            pb.ChainHop(
                host=client.host,
                data_port=client.port,
                session=client.session,
                name=stage.name,
                assignment=stage.connection.assignment,
            )
            for stage, client in zip(chain[1:], clients[1:], strict=True)
        ],
        reply_session=clients[0].session,
        assignment=chain[0].connection.assignment,
    )
    encode_tensor(hidden, out=request.hidden)
    return request


def forward_chain(chain: Sequence[RemoteStage], hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """Run the first stage of `chain` and then the others, each worker passing its output straight to the next;
    the last one answers. Returns the hidden states and how many stages ran: fewer than all when a worker could not
    reach the next one (the caller goes on from there, and these stages are not chained again)."""
    first = chain[0]
    clients = _clients(chain)  # the caller just saw every one chainable; one may have gone down since
    if clients is None:
        return first.forward(hidden, batch), 1
    began = time.perf_counter()
    request = _request(chain, clients, hidden, batch, next(REQUEST_IDS))
    payload = request.SerializeToString()
    replies = _Replies(chain, clients)
    try:
        clients[0].send(payload)
    except (OSError, ConnectionError) as error:
        raise first._broken(error) from None
    stage, reply = replies.next({request.request_id})
    ran = chain.index(stage) + 1
    if ran < len(chain):
        _stop_chaining(chain, reply.chain_error)
    out = on_device_of(decode_tensor(reply.hidden), hidden)
    _record(chain[:ran], list(reply.chain_forward_us), began, len(payload), len(reply.hidden.data))
    return out, ran


def forward_chain_pieces(
    chain: Sequence[RemoteStage],
    pieces: Sequence[tuple[torch.Tensor, Batch]],
    lead: PieceStep | None = None,
    trail: PieceStep | None = None,
) -> list[torch.Tensor] | None:
    """The pieces of one step (cake_py.cluster.micro_batches) through the whole chain, all sent at once: each worker
    computes a piece while the next worker computes the one before. `lead`: the master's own layers before the chain,
    run on each piece just before it is sent; `trail`: its layers after the chain, run on each answer in order as it
    comes, so the master computes while the workers do. Returns each piece's output in order; None when the chain
    cannot take them now (a stage went down since), or a worker could not pass a piece on (these workers are then
    not chained again): the caller runs the batch whole, stage after stage, each stage rewriting the positions the
    pieces reached (a step run again may start before a cache's end).

    The pieces are written by a thread of their own while this one reads the answers: the last worker may answer
    piece 1 before the first worker has read piece 4, and a master that only wrote would leave the last worker's
    answer unread, the last worker blocked writing it, the first blocked passing it a piece, and its own write.
    Over TLS the first worker's connection is not read until the sender is done with it (OpenSSL's state of one
    connection must not be read and written by two threads at once): only errors come back on it, and the first
    worker goes on reading the pieces after an error, so they wait in the socket's buffer meanwhile."""
    clients = _clients(chain)
    if clients is None:
        return None
    request_ids = [next(REQUEST_IDS) for _ in pieces]
    sent_bytes = [0] * len(pieces)
    replies = _Replies(chain, clients)
    stop = threading.Event()  # the reader gave up: no more pieces

    def send_all() -> None:
        sending = False
        try:
            for index, (hidden, batch) in enumerate(pieces):
                if stop.is_set():
                    return
                if lead is not None:
                    replies.sent_at = math.inf  # the master computing its own layers is no stall of the chain's
                    hidden = lead(hidden, batch)
                payload = _request(chain, clients, hidden, batch, request_ids[index]).SerializeToString()
                sent_bytes[index] = len(payload)
                sending = True
                replies.sent_at = time.monotonic()  # (a first worker that stops reading stalls the chain from here)
                clients[0].send(payload)
                sending = False
        except BaseException as error:  # the reader raises it: a broken link as the first stage's failure
            replies.failure.append((error, sending and isinstance(error, (OSError, ConnectionError))))

    sender = threading.Thread(target=send_all, name="cake-chain-sender", daemon=True)
    first_sock = clients[0].sock
    replies.watch(sender, mute=first_sock if isinstance(first_sock, ssl.SSLSocket) else None)
    sender.start()
    waiting = {request_id: index for index, request_id in enumerate(request_ids)}
    outputs: list[torch.Tensor | None] = [None] * len(pieces)
    finished = 0  # the pieces `trail` ran on, in order
    try:
        while waiting:
            stage, reply = replies.next(set(waiting))
            if chain.index(stage) + 1 < len(chain):
                _stop_chaining(chain, reply.chain_error)
                return None
            index = waiting.pop(reply.request_id)
            outputs[index] = on_device_of(decode_tensor(reply.hidden), pieces[index][0])
            _record_piece(chain, list(reply.chain_forward_us), sent_bytes[index], len(reply.hidden.data))
            while trail is not None and finished < len(pieces) and (output := outputs[finished]) is not None:
                outputs[finished] = trail(output, pieces[finished][1])  # a sequence's pieces in their order
                finished += 1
    finally:
        stop.set()
        sender.join(CHAIN_STALL_S)
        if sender.is_alive():  # the first worker stopped reading: its connection is of no more use
            chain[0]._broken(ConnectionError("it stopped reading its input"))
            sender.join()
    return [output for output in outputs if output is not None]


def _stop_chaining(chain: Sequence[RemoteStage], why: str) -> None:
    """A worker of `chain` could not pass its output on: these workers are not chained again."""
    log.warning("%s; these workers are not chained again", why)
    for member in chain:
        member._chain_off = True


class _Replies:
    """The answers to chained forwards: any worker of the chain may answer, the last with a result, another with an
    error or a broken chain."""

    def __init__(self, chain: Sequence[RemoteStage], clients: Sequence[DataPlaneClient]) -> None:
        self.chain = chain
        self.by_socket: dict[socket.socket, RemoteStage] = {}
        for stage, client in zip(chain, clients, strict=True):
            if client.sock is None:  # closed since: the stage was just marked down
                raise stage._broken(ConnectionError("the connection closed"))
            self.by_socket[client.sock] = stage
        self.sent_at = time.monotonic()  # the last request sent: the chain is stalled when no worker worked since
        self.poller = select.poll()  # poll, not select: descriptors may be numbered past select's 1024
        try:
            for sock in self.by_socket:
                self.poller.register(sock, select.POLLIN)
            self.by_fd = {sock.fileno(): sock for sock in self.by_socket}
        except (OSError, ValueError) as error:
            raise chain[0]._broken(error) from None
        self.ready: list[socket.socket] = []
        # A thread writing the requests (pipelined pieces), and the first worker's socket when it must not be read
        # meanwhile (TLS); what stopped that thread, and whether it was the connection (else raised as it is).
        self.writer: threading.Thread | None = None
        self.muted: socket.socket | None = None
        self.failure: list[tuple[BaseException, bool]] = []

    def watch(self, writer: threading.Thread, mute: socket.socket | None = None) -> None:
        """Answers come while `writer` sends the requests: raise what stops it, and leave `mute` unread until it is
        done."""
        self.writer = writer
        if mute is not None:
            self.poller.unregister(mute)
            self.muted = mute

    def _writer_done(self) -> None:
        if self.writer is not None and not self.writer.is_alive():
            if self.muted is not None:
                self.poller.register(self.muted, select.POLLIN)
            self.writer = self.muted = None

    def next(self, request_ids: set[int]) -> tuple[RemoteStage, pb.ForwardReply]:
        """The next answer to one of `request_ids` and the stage that gave it (a worker's error raised as a
        StageError, a broken connection as its stage's); answers to earlier, failed steps are skipped."""
        while True:
            if self.failure:
                error, broken_link = self.failure[0]
                raise self.chain[0]._broken(error) if broken_link else error
            if not self.ready:
                self.ready = self._wait()
                if not self.ready:
                    continue
            sock = self.ready.pop()
            stage = self.by_socket[sock]
            try:
                reply = pb.ForwardReply.FromString(read_frame(sock))
            except (OSError, ConnectionError, DecodeError) as error:
                raise stage._broken(error) from None
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                self.ready.append(sock)  # another answer, already decrypted, which poll cannot see
            if reply.request_id not in request_ids:
                continue  # an answer to an earlier, failed step
            if reply.error:
                raise StageError(f"{stage.connection.label}: {reply.error}")
            if self.chain.index(stage) + 1 < len(self.chain) and not reply.chain_error:
                raise StageError(f"{stage.connection.label} answered a chained forward it should pass on")
            return stage, reply

    def _wait(self) -> list[socket.socket]:
        self._writer_done()
        # While a thread writes the requests, look every so often whether it stopped (failed, or done with a socket).
        timeout_s = WRITER_POLL_S if self.writer is not None else PING_INTERVAL_S
        try:
            # A TLS socket may hold an answer already decrypted, which poll cannot see.
            readable: list[socket.socket] = [
                s for s in self.by_socket if s is not self.muted and isinstance(s, ssl.SSLSocket) and s.pending()
            ]
            readable = readable or [self.by_fd[fd] for fd, _ in self.poller.poll(timeout_s * 1000)]
        except (OSError, ValueError) as error:  # a socket closed under us: its stage was marked down
            down = next((stage for stage in self.chain if not stage._up), self.chain[0])
            raise down._broken(error) from None
        if not readable and _stalled(self.chain, self.sent_at):
            for member in self.chain:
                member._chain_off = True
            raise StageError(
                f"chained forward through {', '.join(s.name for s in self.chain)} was lost: no worker has worked "
                f"on it for {CHAIN_STALL_S:.0f} s; these workers are not chained again"
            )
        return readable


def _record(ran: Sequence[RemoteStage], forward_us: list[int], began: float, sent: int, received: int) -> None:
    """Each stage's own compute, the chain's transfer time shared out evenly as each stage's hop, and the bytes
    that went into and out of each stage (from the master or from the worker before it: the same sizes)."""
    total_ms = (time.perf_counter() - began) * 1000
    forwards = [us / 1000 for us in forward_us[: len(ran)]] + [0.0] * (len(ran) - len(forward_us))
    transfer = max(total_ms - sum(forwards), 0.0) / len(ran)
    for stage, forward_ms in zip(ran, forwards, strict=True):
        stage.stats.record(forward_ms, forward_ms + transfer, sent, received)
        stage.chained_calls += 1


def _record_piece(chain: Sequence[RemoteStage], forward_us: list[int], sent: int, received: int) -> None:
    """A piece of a pipelined step, as a call of each stage: its own compute, and its hop taken as the stage's
    current figure (pieces overlap, so their transfer times cannot be told apart from the others' compute)."""
    for stage, us in zip(chain, (forward_us + [0] * len(chain))[: len(chain)], strict=True):
        hop_ms = max(stage.stats.round_trip_ms - stage.stats.forward_ms, 0.0)
        stage.stats.record(us / 1000, us / 1000 + hop_ms, sent, received)
        stage.chained_calls += 1
