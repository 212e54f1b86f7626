"""The worker's fast-path handler: whatever fails while it serves a frame, the master gets an answer.

A chained request that died silently on a worker would leave its master waiting on connections that all stay
open; a plain one would close the connection and take a healthy worker down."""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from cake_py.config import WorkerSettings, WorkerSpec
from cake_py.errors import ClusterError
from cake_py.models.hub import ModelSource, resolve_model
from cake_py.models.kv_cache import Batch, KVStore
from cake_py.rpc import PROTOCOL_VERSION
from cake_py.rpc.codec import encode_tensor
from cake_py.rpc.connection import Assignment, WorkerConnection
from cake_py.rpc.dataplane_client import PeerLinks
from cake_py.rpc.forward import ForwardActivity
from cake_py.rpc.pb import worker_pb2 as pb
from cake_py.rpc.pb import worker_pb2_grpc as pb_grpc
from cake_py.rpc.server import WorkerServicer
from cake_py.rpc.weight_cache import LOCK_FILE, TensorWriter


class BrokenLayers:
    """Layers whose forward fails in a way no handler expects."""

    start, end = 0, 1
    config = SimpleNamespace(hidden_size=4)

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


def test_a_master_probing_again_and_again_is_logged_once(
    servicer: WorkerServicer, caplog: pytest.LogCaptureFixture
) -> None:
    """Failover probes a left-out worker every few seconds: its log must not fill with the same handshake."""
    caplog.set_level(logging.INFO, logger="cake_py.rpc.server")
    servicer.dataplane = None  # only gRPC
    for master in ("m1", "m1", "m1", "m2", "m2"):
        reply = servicer.Handshake(
            pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, master_name=master),
            Context(),  # type: ignore[arg-type]
        )
        assert reply.protocol_version == PROTOCOL_VERSION
    assert [record.getMessage() for record in caplog.records] == [
        "handshake from master 'm1'",
        "handshake from master 'm2'",
    ]


# ---- Assign: what an assignment that does not finish leaves behind ----


class Context:
    """The bits of grpc.ServicerContext the handlers use."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"aborted: {details}")

    def is_active(self) -> bool:
        return True


def assign_messages(source: ModelSource, start: int, end: int) -> list[pb.AssignChunk]:
    """What a master streams for layers [start, end) of `source` in float32, to a worker with an empty cache."""
    assignment = Assignment(
        source.model_id, json.dumps(source.weights.config), source.weights, start, end, torch.float32
    )
    specs = WorkerConnection(WorkerSpec("w", "127.0.0.1:1"), None, None).manifest(assignment)
    header = pb.AssignHeader(
        model_id=source.model_id,
        config_json=assignment.config_json,
        layers=pb.LayerRange(start=start, end=end),
        compute_dtype=pb.DTYPE_FLOAT32,
        tensors=specs,
    )
    messages = [pb.AssignChunk(header=header)]
    for name, tensor in assignment.tensors():
        data = ctypes.string_at(tensor.data_ptr(), tensor.nbytes)
        messages.append(pb.AssignChunk(chunk=pb.TensorChunk(name=name, offset=0, data=data)))
    return messages


def cut_off(messages: list[pb.AssignChunk], after: int) -> Iterator[pb.AssignChunk]:
    """The stream as the servicer reads it when the master goes away after `after` messages."""
    yield from messages[:after]
    raise RuntimeError("the master cancelled the call")


@pytest.fixture
def fresh_worker(tmp_path: Path) -> WorkerServicer:
    return WorkerServicer(WorkerSettings(name="w1", cache_dir=tmp_path / "cache"), "cpu", 1.0)


def test_an_assignment_cut_off_keeps_the_previous_layers(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    source = resolve_model(str(tiny_llama))
    fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    held = fresh_worker.model
    assert held is not None and fresh_worker.status == pb.WORKER_STATUS_READY
    with pytest.raises(RuntimeError, match="cancelled"):
        fresh_worker.Assign(cut_off(assign_messages(source, 1, 3), 2), Context())  # type: ignore[arg-type]
    assert fresh_worker.model is held and fresh_worker.status == pb.WORKER_STATUS_READY
    assert not list((fresh_worker.settings.cache_dir).glob("*.partial"))


@pytest.mark.parametrize("fault", ["int8-compute", "shape-past-bytes", "huge-shape", "config-unlike-tensors"])
def test_a_header_torch_would_refuse_is_refused_before_the_old_layers_go(
    fresh_worker: WorkerServicer, tiny_llama: Path, fault: str
) -> None:
    """An int8 compute dtype or a shape bigger than its bytes failed while loading, after the old layers were freed:
    UNKNOWN, and the worker FAILED."""
    source = resolve_model(str(tiny_llama))
    fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    held = fresh_worker.model
    messages = assign_messages(source, 1, 3)
    header = messages[0].header
    if fault == "int8-compute":
        header.compute_dtype = pb.DTYPE_INT8
        needle = "compute dtype torch.int8 is not a floating-point type"
    elif fault == "config-unlike-tensors":  # a config the announced tensors do not fit
        header.config_json = json.dumps({**json.loads(header.config_json), "intermediate_size": 4096})
        needle = "the announced layers cannot be built: tensor for 'layers.0.feed_forward.w13.weight' has shape"
    else:
        spec = header.tensors[0]
        spec.shape[:] = [64, 64, 64] if fault == "shape-past-bytes" else [2**40, 2**20]
        needle = f"tensor {spec.name!r}: shape"
    with pytest.raises(RuntimeError, match=needle):
        fresh_worker.Assign(iter(messages), Context())  # type: ignore[arg-type]
    assert fresh_worker.model is held and fresh_worker.status == pb.WORKER_STATUS_READY


def test_an_assignment_cut_off_with_nothing_held_is_failed(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    source = resolve_model(str(tiny_llama))
    messages = assign_messages(source, 0, 2)
    # Half a tensor, then the end: the partial file is dropped, the worker is FAILED and says why.
    first = messages[1].chunk
    half = pb.AssignChunk(chunk=pb.TensorChunk(name=first.name, offset=0, data=first.data[: len(first.data) // 2]))
    with pytest.raises(RuntimeError, match="cancelled"):
        fresh_worker.Assign(cut_off([messages[0], half], 2), Context())  # type: ignore[arg-type]
    assert fresh_worker.status == pb.WORKER_STATUS_FAILED and "cancelled" in fresh_worker.error
    assert not [p for p in fresh_worker.settings.cache_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE]


def test_old_layers_are_freed_before_the_new_ones_load(
    fresh_worker: WorkerServicer, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = resolve_model(str(tiny_llama))
    fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    holding_while_loading: list[bool] = []
    real_load = fresh_worker.cache.load

    def load(sha256: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        holding_while_loading.append(fresh_worker.model is not None)
        return real_load(sha256, dtype, shape)

    monkeypatch.setattr(fresh_worker.cache, "load", load)
    fresh_worker.Assign(iter(assign_messages(source, 1, 3)), Context())  # type: ignore[arg-type]
    assert holding_while_loading and not any(holding_while_loading)
    assert fresh_worker.model is not None and (fresh_worker.model.start, fresh_worker.model.end) == (1, 3)
    assert fresh_worker.weights_bytes == sum(p.nbytes for p in fresh_worker.model.parameters())


def test_a_master_of_another_protocol_version_is_refused_naming_both(fresh_worker: WorkerServicer) -> None:
    """A master built from another .proto would misread or be misread (protocol 5 added the slices' rope_end): its
    handshake is refused, saying which versions met."""
    older = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION - 1, master_name="old")
    with pytest.raises(RuntimeError, match=f"protocol version {PROTOCOL_VERSION - 1} is not this worker's "
                       f"{PROTOCOL_VERSION}: run the same cake_py version"):  # fmt: skip
        fresh_worker.Handshake(older, Context())  # type: ignore[arg-type]


def test_handshake_counts_the_memory_held_layers_would_give_back(fresh_worker: WorkerServicer) -> None:
    handshake = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION)
    plain = fresh_worker.Handshake(handshake, Context())  # type: ignore[arg-type]
    assert plain.host.memory_free_bytes < plain.host.memory_total_bytes
    fresh_worker.weights_bytes = plain.host.memory_total_bytes  # as if its layers filled the memory
    credited = fresh_worker.Handshake(handshake, Context())  # type: ignore[arg-type]
    assert credited.host.memory_free_bytes == credited.host.memory_total_bytes
    assert (plain.held_bytes, credited.held_bytes) == (0, plain.host.memory_total_bytes)  # for a shared host's sum


def test_a_forward_placed_with_another_assignment_is_refused(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    source = resolve_model(str(tiny_llama))
    first = fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    handshake = fresh_worker.Handshake(pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION), Context())  # type: ignore[arg-type]
    assert first.assignment and handshake.assignment == first.assignment

    def forward(assignment: int, seq_id: int) -> pb.ForwardReply:
        message = pb.ForwardRequest(
            request_id=1, sequences=[pb.SequenceSlice(seq_id=seq_id, start_pos=0, n_tokens=1)], assignment=assignment
        )
        encode_tensor(torch.ones(1, source.config.hidden_size), out=message.hidden)
        answer = fresh_worker.forward_frame(message.SerializeToString())
        assert answer is not None
        return pb.ForwardReply.FromString(answer)

    assert forward(first.assignment, 1).error == ""
    assert forward(0, 2).error == ""  # 0: a master that does not check
    # Another master places other layers here: our next forward must fail, not run them.
    second = fresh_worker.Assign(iter(assign_messages(source, 1, 3)), Context())  # type: ignore[arg-type]
    assert second.assignment != first.assignment
    refused = forward(first.assignment, 3)
    assert "re-assigned" in refused.error and "layers 1-2" in refused.error


def test_a_copy_from_a_sequence_the_worker_lacks_is_refused(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    source = resolve_model(str(tiny_llama))
    fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]

    def forward(*pieces: pb.SequenceSlice) -> pb.ForwardReply:
        message = pb.ForwardRequest(request_id=1, sequences=list(pieces))
        encode_tensor(torch.ones(sum(p.n_tokens for p in pieces), source.config.hidden_size), out=message.hidden)
        answer = fresh_worker.forward_frame(message.SerializeToString())
        assert answer is not None
        return pb.ForwardReply.FromString(answer)

    assert forward(pb.SequenceSlice(seq_id=1, start_pos=0, n_tokens=3)).error == ""
    copied = forward(pb.SequenceSlice(seq_id=2, start_pos=2, n_tokens=1, copy_from=1))
    assert copied.error == "" and fresh_worker.kv is not None and fresh_worker.kv.length(2) == 3
    beyond = forward(pb.SequenceSlice(seq_id=3, start_pos=5, n_tokens=1, copy_from=1))
    assert "copy of 5 positions of sequence 1, which holds 3" in beyond.error
    missing = forward(pb.SequenceSlice(seq_id=4, start_pos=1, n_tokens=1, copy_from=99))
    assert "sequence 99, which holds 0" in missing.error
    # A copy of itself cleared the sequence's own cache; one sequence twice in a forward cut it back.
    itself = forward(pb.SequenceSlice(seq_id=1, start_pos=3, n_tokens=1, copy_from=1))
    assert itself.error == "sequence 1 cannot start as a copy of itself" and fresh_worker.kv.length(1) == 3
    twice = forward(
        pb.SequenceSlice(seq_id=1, start_pos=3, n_tokens=1), pb.SequenceSlice(seq_id=1, start_pos=1, n_tokens=1)
    )
    assert twice.error == "sequence 1 appears twice in one forward" and fresh_worker.kv.length(1) == 3


def test_a_release_for_another_assignment_frees_nothing(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    source = resolve_model(str(tiny_llama))
    reply = fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    message = pb.ForwardRequest(request_id=1, sequences=[pb.SequenceSlice(seq_id=1, start_pos=0, n_tokens=2)])
    encode_tensor(torch.ones(2, source.config.hidden_size), out=message.hidden)
    assert pb.ForwardReply.FromString(fresh_worker.forward_frame(message.SerializeToString()) or b"").error == ""
    stale = fresh_worker.Release(pb.ReleaseRequest(seq_ids=[1], assignment=reply.assignment ^ 2), Context())  # type: ignore[arg-type]
    assert stale.released == 0 and fresh_worker.kv is not None and fresh_worker.kv.sequence_ids() == [1]
    ours = fresh_worker.Release(pb.ReleaseRequest(seq_ids=[1], assignment=reply.assignment), Context())  # type: ignore[arg-type]
    assert ours.released == 1 and fresh_worker.kv.sequence_ids() == []


def test_a_full_disk_fails_the_assignment_naming_the_cache_and_leaves_no_temp_files(
    fresh_worker: WorkerServicer, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = resolve_model(str(tiny_llama))
    real_write = TensorWriter.write
    writes = 0

    def filling(self: TensorWriter, offset: int, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes > 3:
            raise OSError(28, "No space left on device")
        real_write(self, offset, data)

    monkeypatch.setattr(TensorWriter, "write", filling)
    with pytest.raises(RuntimeError, match="cannot write the weight cache .*No space left on device"):
        fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    assert str(fresh_worker.settings.cache_dir) in fresh_worker.error
    assert not list(fresh_worker.settings.cache_dir.glob("??/*.partial"))


def test_an_assign_counts_as_activity(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    """Another master's takeover rule reads forward_idle_seconds: a fresh assignment must not look idle."""
    source = resolve_model(str(tiny_llama))
    time.sleep(0.3)
    before = fresh_worker.activity.idle_seconds()
    fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    assert before >= 0.3 and fresh_worker.activity.idle_seconds() < 0.3


def test_a_disk_too_small_for_the_missing_weights_is_refused_before_they_stream(
    fresh_worker: WorkerServicer, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = resolve_model(str(tiny_llama))
    header = assign_messages(source, 0, 2)[0].header
    needed = sum(spec.size_bytes for spec in header.tensors)
    monkeypatch.setattr(fresh_worker.cache, "free_bytes", lambda: needed - 1)
    prepare = pb.PrepareRequest(model_id=source.model_id, tensors=header.tensors)
    with pytest.raises(RuntimeError, match=r"weight cache .* has 0\.00 GB free and the missing weights need 0\.00 GB"):
        fresh_worker.Prepare(prepare, Context())  # type: ignore[arg-type]
    monkeypatch.setattr(fresh_worker.cache, "free_bytes", lambda: needed)
    assert len(fresh_worker.Prepare(prepare, Context()).missing_sha256) == len(header.tensors)  # type: ignore[arg-type]
    # Once cached, nothing is missing: any free space will do.
    fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    monkeypatch.setattr(fresh_worker.cache, "free_bytes", lambda: 0)
    assert fresh_worker.Prepare(prepare, Context()).missing_sha256 == []  # type: ignore[arg-type]


def test_a_cache_size_limit_evicts_the_weights_unused_the_longest(tmp_path: Path, tiny_llama: Path) -> None:
    """--cache-max-gb: layers 0-1 then 2-3 fit only one at a time; the second assignment's Prepare deletes the first's
    weights (unused the longest) before any streams, and a limit smaller than one assignment is a refusal naming it."""
    source = resolve_model(str(tiny_llama))
    first, second = assign_messages(source, 0, 1), assign_messages(source, 1, 2)
    sizes = [sum(spec.size_bytes for spec in messages[0].header.tensors) for messages in (first, second)]
    worker = WorkerServicer(WorkerSettings(cache_dir=tmp_path, cache_max_bytes=max(sizes) + 100), "cpu", 1.0)

    def prepare(messages: list[pb.AssignChunk]) -> list[str]:
        request = pb.PrepareRequest(model_id=source.model_id, tensors=messages[0].header.tensors)
        return list(worker.Prepare(request, Context()).missing_sha256)  # type: ignore[arg-type]

    assert prepare(first)
    worker.Assign(iter(first), Context())  # type: ignore[arg-type]
    assert prepare(first) == []  # cached, and within the limit
    worker.Assign(iter(first[:1]), Context())  # type: ignore[arg-type]  # loaded from the cache: nothing streams
    first_files = {spec.sha256 for spec in first[0].header.tensors}
    assert len(prepare(second)) == len(second[0].header.tensors)
    on_disk = {sha for _, _, sha in worker.cache.files()}
    assert not first_files & on_disk  # made room for the second before it streamed
    worker.Assign(iter(second), Context())  # type: ignore[arg-type]
    assert sum(size for _, size, _ in worker.cache.files()) <= max(sizes) + 100
    small = WorkerServicer(WorkerSettings(cache_dir=tmp_path / "small", cache_max_bytes=min(sizes) - 1), "cpu", 1.0)
    request = pb.PrepareRequest(model_id=source.model_id, tensors=first[0].header.tensors)
    with pytest.raises(RuntimeError, match="--cache-max-gb"):
        small.Prepare(request, Context())  # type: ignore[arg-type]


def test_a_gpu_worker_gives_dropped_layers_back_and_counts_what_its_allocator_holds(
    fresh_worker: WorkerServicer, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU, torch's allocator keeps a dropped model's blocks (and activations') reserved: the worker empties
    it when it drops layers, and a handshake credits all of it as memory the next assignment frees."""
    from cake_py.rpc import server

    released: list[str] = []
    monkeypatch.setattr(server, "release_device_memory", released.append)
    monkeypatch.setattr(server, "held_device_memory", lambda device: 10**12 if device == "cuda" else 0)
    source = resolve_model(str(tiny_llama))
    first = fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    assert released == ["cpu"]  # the previous (no) layers, dropped before loading
    handshake = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION)
    assert fresh_worker.Handshake(handshake, Context()).held_bytes == fresh_worker.weights_bytes  # type: ignore[arg-type]
    fresh_worker.device = "cuda"
    assert fresh_worker.Handshake(handshake, Context()).held_bytes == 10**12  # type: ignore[arg-type]
    unassign = pb.UnassignRequest(assignment=first.assignment)
    assert fresh_worker.Unassign(unassign, Context()).dropped  # type: ignore[arg-type]
    assert released == ["cpu", "cuda"]
    assert fresh_worker.Handshake(handshake, Context()).held_bytes == 0  # type: ignore[arg-type]  # holds nothing now


def test_streams_past_the_limit_are_refused_so_control_calls_keep_their_threads(fresh_worker: WorkerServicer) -> None:
    """Sixteen Forward streams left open took every thread of the pool: Info, Handshake and every other master's
    calls then timed out."""
    from cake_py.rpc.forward import MAX_STREAMS

    held = [fresh_worker._stream_slot(Context()) for _ in range(MAX_STREAMS)]  # streams open, sending nothing
    for slot in held:
        slot.__enter__()
    try:
        with pytest.raises(RuntimeError, match=f"already has {MAX_STREAMS} streams"):
            next(fresh_worker.Forward(iter([]), Context()))  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match=r"streams \(Forward, Assign\) open"):
            fresh_worker.Assign(iter([]), Context())  # type: ignore[arg-type]
    finally:
        for slot in held:
            slot.__exit__(None, None, None)
    assert list(fresh_worker.Forward(iter([]), Context())) == []  # type: ignore[arg-type]  # room again


def test_hidden_states_that_cannot_be_the_batchs_are_named(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    source = resolve_model(str(tiny_llama))
    fresh_worker.Assign(iter(assign_messages(source, 0, 2)), Context())  # type: ignore[arg-type]
    width = source.config.hidden_size

    def forward(hidden: torch.Tensor, *pieces: pb.SequenceSlice) -> str:
        message = pb.ForwardRequest(request_id=1, sequences=list(pieces))
        encode_tensor(hidden, out=message.hidden)
        answer = fresh_worker.forward_frame(message.SerializeToString())
        assert answer is not None
        return pb.ForwardReply.FromString(answer).error

    one = pb.SequenceSlice(seq_id=1, start_pos=0, n_tokens=1)
    assert forward(torch.ones(1, width), one) == ""
    assert f"shape [1, {width + 1}] do not match the batch (1 tokens of {width})" in forward(
        torch.ones(1, width + 1), one
    )
    assert "must be floating point, not torch.int64" in forward(torch.ones(1, width, dtype=torch.int64), one)
    hops = [pb.ChainHop(host="127.0.0.1", data_port=1, session=b"n" * 16, name="w")] * 257
    message = pb.ForwardRequest(request_id=1, sequences=[one], next=hops)  # no reply_session: answered here
    encode_tensor(torch.ones(1, width), out=message.hidden)
    answer = fresh_worker.forward_frame(message.SerializeToString())
    assert answer is not None and "a chain of 257 more workers is over 256" in pb.ForwardReply.FromString(answer).error
    empty = pb.SequenceSlice(seq_id=2, start_pos=0, n_tokens=0)
    assert "at least one token each" in forward(torch.ones(0, width), empty)
    assert "at least one token each" in forward(torch.ones(0, width))


def test_a_second_assign_while_one_loads_is_refused(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    """Two masters starting together: both Assigns ran at once and both were told "assigned", one stage then down."""
    source = resolve_model(str(tiny_llama))
    streaming, go_on = threading.Event(), threading.Event()

    def slow(messages: list[pb.AssignChunk]) -> Iterator[pb.AssignChunk]:
        yield messages[0]
        streaming.set()
        go_on.wait(30)
        yield from messages[1:]

    first = threading.Thread(
        target=fresh_worker.Assign, args=(slow(assign_messages(source, 0, 2)), Context()), daemon=True
    )
    first.start()
    try:
        assert streaming.wait(30)
        with pytest.raises(RuntimeError, match="loading layers for another assignment"):
            fresh_worker.Assign(iter(assign_messages(source, 1, 3)), Context())  # type: ignore[arg-type]
    finally:
        go_on.set()
        first.join(30)
    assert fresh_worker.model is not None and (fresh_worker.model.start, fresh_worker.model.end) == (0, 2)
    fresh_worker.Assign(iter(assign_messages(source, 1, 3)), Context())  # type: ignore[arg-type]  # once it is done
    assert (fresh_worker.model.start, fresh_worker.model.end) == (1, 3)


def test_an_assignment_the_master_cut_off_says_so(fresh_worker: WorkerServicer, tiny_llama: Path) -> None:
    """gRPC ends the stream of a master that cancelled or went away with an RpcError whose text is empty: the log and
    the status must still say what happened (they said "RpcError: ")."""
    messages = assign_messages(resolve_model(str(tiny_llama)), 0, 2)

    def cancelled() -> Iterator[pb.AssignChunk]:
        yield from messages[:2]
        raise grpc.RpcError()

    with pytest.raises(grpc.RpcError):
        fresh_worker.Assign(cancelled(), Context())  # type: ignore[arg-type]
    assert fresh_worker.status == pb.WORKER_STATUS_FAILED
    assert fresh_worker.error == "the master cancelled the stream or its connection broke"


def test_an_assign_stream_that_sends_nothing_is_given_up_and_frees_the_worker(tmp_path: Path, tiny_llama: Path) -> None:
    """A master frozen mid-stream (SIGSTOP) held the worker's one Assign for as long as the call's hour: every other
    master was refused meanwhile, "loading layers for another assignment". Over real gRPC: the wait it must end is
    gRPC's own."""
    settings = WorkerSettings(name="w1", cache_dir=tmp_path / "cache", assign_idle_seconds=1)
    worker = WorkerServicer(settings, "cpu", 1.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    messages = assign_messages(resolve_model(str(tiny_llama)), 0, 2)
    thawed = threading.Event()

    def header_then_nothing() -> Iterator[pb.AssignChunk]:
        yield messages[0]
        thawed.wait(60)

    try:
        stub = pb_grpc.WorkerStub(channel)
        frozen = stub.Assign.future(header_then_nothing())
        with pytest.raises(grpc.RpcError):  # given up: not a FutureTimeoutError
            frozen.result(timeout=30)
        deadline = time.monotonic() + 30  # the call ends as the worker cancels it; its handler goes on a moment
        while worker._assigning.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.status == pb.WORKER_STATUS_FAILED
        assert worker.error.startswith("the master sent nothing for 1 s"), worker.error
        assert stub.Assign(iter(messages), timeout=30).layers.end == 2  # the next master is not refused
        assert worker.status == pb.WORKER_STATUS_READY
    finally:
        thawed.set()
        channel.close()
        server.stop(None)
