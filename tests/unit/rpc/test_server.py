"""The worker's fast-path handler: whatever fails while it serves a frame, the master gets an answer.

A chained request that died silently on a worker would leave its master waiting on connections that all stay
open; a plain one would close the connection and take a healthy worker down."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cake_py.config import WorkerSettings
from cake_py.errors import ClusterError
from cake_py.models.kv_cache import Batch, KVStore
from cake_py.rpc.codec import encode_tensor
from cake_py.rpc.dataplane import PeerLinks
from cake_py.rpc.pb import worker_pb2 as pb
from cake_py.rpc.server import ForwardActivity, WorkerServicer


class BrokenLayers:
    """Layers whose forward fails in a way no handler expects."""

    start, end = 0, 1

    def forward_layers(self, hidden: torch.Tensor, batch: Batch, kv: KVStore) -> torch.Tensor:
        raise TypeError("unexpected layer failure")


class Sessions:
    """Stands in for the DataPlaneServer: records what was written on each master session."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, pb.ForwardReply]] = []

    def send_to_session(self, session: bytes, payload: bytes) -> bool:
        self.sent.append((session, pb.ForwardReply.FromString(payload)))
        return True


@pytest.fixture
def servicer(tmp_path: Path) -> WorkerServicer:
    worker = WorkerServicer(WorkerSettings(name="w1", cache_dir=tmp_path), "cpu", 1.0)
    worker.model = BrokenLayers()  # type: ignore[assignment]
    worker.kv = KVStore(1, 1, 4, torch.float32, torch.device("cpu"))
    worker.compute_dtype = torch.float32
    worker.dataplane = Sessions()  # type: ignore[assignment]
    return worker


def request(**chain: object) -> pb.ForwardRequest:
    """Request 41: one token of sequence 1; `chain` fields make it a chained one."""
    message = pb.ForwardRequest(request_id=41, sequences=[pb.SequenceSlice(seq_id=1, start_pos=0, n_tokens=1)], **chain)
    encode_tensor(torch.ones(1, 4), out=message.hidden)
    return message


def test_a_plain_request_is_answered_with_the_error(servicer: WorkerServicer) -> None:
    answer = servicer.forward_frame(request().SerializeToString())
    assert answer is not None
    reply = pb.ForwardReply.FromString(answer)
    assert reply.request_id == 41
    assert "'w1'" in reply.error and "TypeError: unexpected layer failure" in reply.error


def test_a_chained_request_is_answered_on_the_masters_session(servicer: WorkerServicer) -> None:
    reply = chained_answer(servicer)
    assert reply.request_id == 41 and "TypeError: unexpected layer failure" in reply.error


def chained_answer(servicer: WorkerServicer) -> pb.ForwardReply:
    """Send a chained request (master session b"m"*16, then worker w2); the one answer written on the session."""
    chained = request(
        reply_session=b"m" * 16, next=[pb.ChainHop(host="127.0.0.1", data_port=1, session=b"n" * 16, name="w2")]
    )
    assert servicer.forward_frame(chained.SerializeToString()) is None
    sessions = servicer.dataplane
    assert isinstance(sessions, Sessions)
    [(session, reply)] = sessions.sent
    assert session == b"m" * 16
    return reply


class BrokenPeers:
    def send(self, host: str, port: int, payload: bytes) -> None:
        raise TypeError("unexpected link failure")


def test_a_failure_passing_a_chained_request_on_is_answered_on_the_masters_session(
    servicer: WorkerServicer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BrokenLayers, "forward_layers", lambda self, hidden, batch, kv: hidden * 2)
    servicer.peers = BrokenPeers()  # type: ignore[assignment]
    reply = chained_answer(servicer)
    assert reply.request_id == 41 and "TypeError: unexpected link failure" in reply.error


def test_a_next_hop_no_socket_can_reach_is_a_chain_error_naming_it() -> None:
    """The worker then answers the master with its output (a chain_error) instead of failing the step."""
    with pytest.raises(ClusterError, match="bad-host:1"):
        PeerLinks(None, timeout=1).send("bad-host", 1, b"frame")


def test_forward_activity_reads_idle_only_between_forwards(servicer: WorkerServicer) -> None:
    """A master reads 0 as "working, or cannot tell", so an idle worker never reports 0."""
    activity = ForwardActivity()
    assert activity.idle_seconds() > 0
    activity.begin()
    activity.begin()
    activity.end()
    assert activity.idle_seconds() == 0  # one still in progress
    activity.end()
    assert 0 < activity.idle_seconds() < 5
    servicer.forward_frame(request().SerializeToString())  # fails inside, still counted as ended
    assert servicer.activity.idle_seconds() > 0
    assert servicer.Info(pb.InfoRequest(), None).forward_idle_seconds > 0  # type: ignore[arg-type]
