"""Chained forward: the master sends a step's hidden states to the first worker of a run of stages on the fast
path, each worker passes its output straight to the next, and the last answers (one handoff per stage instead of a
round trip to the master each). Any worker of the chain may answer instead, with an error or a broken link.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import ssl
import time
from collections.abc import Sequence
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

log = logging.getLogger(__name__)

# One sequence for every stage of the process: a late answer to a failed step can never match a newer request.
REQUEST_IDS = itertools.count(1)

# A chained forward that no worker of its chain has worked on for this long was lost on the way (a worker's
# connection thread died with it, say): the step fails instead of waiting forever.
CHAIN_STALL_S = 30.0


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
        pb.SequenceSlice(seq_id=s.seq_id, start_pos=s.start_pos, n_tokens=s.n_tokens, copy_from=s.copy_from or 0)
        for s in batch
    ]


def forward_chain(chain: Sequence[RemoteStage], hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """Run the first stage of `chain` and then the others, each worker passing its output straight to the next;
    the last one answers. Returns the hidden states and how many stages ran: fewer than all when a worker could not
    reach the next one (the caller goes on from there, and these stages are not chained again)."""
    first, followers = chain[0], chain[1:]
    clients = []
    for stage in chain:  # the caller just saw every one chainable; one may have gone down since
        client = stage._fast
        if client is None or not stage._up:
            return first.forward(hidden, batch), 1
        clients.append(client)
    began = time.perf_counter()
    request = pb.ForwardRequest(
        request_id=next(REQUEST_IDS),
        sequences=wire_slices(batch),
        next=[
            pb.ChainHop(
                host=client.host,
                data_port=client.port,
                session=client.session,
                name=stage.name,
                assignment=stage.connection.assignment,
            )
            for stage, client in zip(followers, clients[1:], strict=True)
        ],
        reply_session=clients[0].session,
        assignment=first.connection.assignment,
    )
    encode_tensor(hidden, out=request.hidden)
    payload = request.SerializeToString()
    # Any worker of the chain may answer: the last with the result, another with an error or a broken chain.
    by_socket: dict[socket.socket, RemoteStage] = {}
    for stage, client in zip(chain, clients, strict=True):
        if client.sock is None:  # closed since: the stage was just marked down
            raise stage._broken(ConnectionError("the connection closed"))
        by_socket[client.sock] = stage
    try:
        clients[0].send(payload)
        sent_at = time.monotonic()
        poller = select.poll()  # poll, not select: descriptors may be numbered past select's 1024
        for sock in by_socket:
            poller.register(sock, select.POLLIN)
        by_fd = {sock.fileno(): sock for sock in by_socket}
    except (OSError, ConnectionError) as error:
        raise first._broken(error) from None
    while True:
        try:
            # A TLS socket may hold an answer already decrypted, which poll cannot see.
            readable: list[socket.socket] = [s for s in by_socket if isinstance(s, ssl.SSLSocket) and s.pending()]
            readable = readable or [by_fd[fd] for fd, _ in poller.poll(PING_INTERVAL_S * 1000)]
        except (OSError, ValueError) as error:  # a socket closed under us: its stage was marked down
            down = next((stage for stage in chain if not stage._up), first)
            raise down._broken(error) from None
        if not readable and _stalled(chain, sent_at):
            for member in chain:
                member._chain_off = True
            raise StageError(
                f"chained forward {request.request_id} through {', '.join(s.name for s in chain)} was lost: no "
                f"worker has worked on it for {CHAIN_STALL_S:.0f} s; these workers are not chained again"
            )
        for sock in readable:
            stage = by_socket[sock]
            try:
                reply = pb.ForwardReply.FromString(read_frame(sock))
            except (OSError, ConnectionError, DecodeError) as error:
                raise stage._broken(error) from None
            if reply.request_id != request.request_id:
                continue  # an answer to an earlier, failed step
            if reply.error:
                raise StageError(f"{stage.connection.label}: {reply.error}")
            ran = chain.index(stage) + 1
            if ran < len(chain):
                if not reply.chain_error:
                    raise StageError(f"{stage.connection.label} answered a chained forward it should pass on")
                log.warning("%s; these workers are not chained again", reply.chain_error)
                for member in chain:
                    member._chain_off = True
            out = on_device_of(decode_tensor(reply.hidden), hidden)
            forward_us = list(reply.chain_forward_us)
            _record(chain[:ran], forward_us, began, len(payload), len(reply.hidden.data))
            return out, ran


def _record(ran: Sequence[RemoteStage], forward_us: list[int], began: float, sent: int, received: int) -> None:
    """Each stage's own compute, the chain's transfer time shared out evenly as each stage's hop, and the bytes
    that went into and out of each stage (from the master or from the worker before it: the same sizes)."""
    total_ms = (time.perf_counter() - began) * 1000
    forwards = [us / 1000 for us in forward_us[: len(ran)]] + [0.0] * (len(ran) - len(forward_us))
    transfer = max(total_ms - sum(forwards), 0.0) / len(ran)
    for stage, forward_ms in zip(ran, forwards, strict=True):
        stage.stats.record(forward_ms, forward_ms + transfer, sent, received)
        stage.chained_calls += 1
