"""Building the master's pipeline over workers: handshake, placement, weight streaming, stage order."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import torch

from cake_py.cluster.hostinfo import device_memory, host_facts, memory_identity
from cake_py.cluster.pipeline import MICRO_BATCH_TOKENS, Pipeline, load_ends
from cake_py.cluster.placement import NodeCapacity, check_manual, place_automatically
from cake_py.cluster.stage import LocalStage, Stage
from cake_py.config import ServeSettings, WorkerSpec
from cake_py.errors import ClusterError
from cake_py.models.hub import ModelSource
from cake_py.models.weights import LAYER_PATTERN, load_transformer, loaded_sizes
from cake_py.rpc.client import Assignment, RemoteStage, WorkerConnection
from cake_py.rpc.connection import TAKEOVER_IDLE_S
from cake_py.rpc.dataplane_client import client_tls
from cake_py.rpc.pb import worker_pb2 as pb
from cake_py.rpc.security import channel_credentials, warn_if_key_in_plaintext
from cake_py.rpc.stage_description import host_description, host_details

log = logging.getLogger(__name__)
T = TypeVar("T")


def layer_bytes(source: ModelSource, dtype: torch.dtype, device: str | None = None) -> list[int]:
    """Bytes each layer takes in memory once loaded in `dtype`: on `device` (quantized weights kept where its
    kernels run them), or dense wherever it goes (placement spans devices that may not keep them)."""
    sizes = [0] * source.config.n_layers
    for name, size in loaded_sizes(source.weights, dtype, device):
        match = LAYER_PATTERN.match(name)
        if match and int(match.group(1)) < len(sizes):
            sizes[int(match.group(1))] += size
    return sizes


def ends_bytes(source: ModelSource, dtype: torch.dtype, device: str | None = None) -> int:
    """Bytes the master's own part (embedding, final norm, head) takes once loaded in `dtype` (on `device`)."""
    return sum(size for name, size in loaded_sizes(source.weights, dtype, device) if not LAYER_PATTERN.match(name))


def check_addresses(workers: list[WorkerSpec]) -> None:
    """One worker process holds one layer range: listing it twice would give it two ranges and run the wrong one."""
    seen: dict[str, str] = {}
    for spec in workers:
        if spec.address in seen:
            raise ClusterError(f"workers {seen[spec.address]!r} and {spec.name!r} have the same address {spec.address}")
        seen[spec.address] = spec.name


def memory_pool(host: Any) -> str:
    """A handshake's HostInfo → its memory pool. Workers naming the same pool draw on one memory: a host's RAM,
    or one GPU (by its UUID; not every GPU of a box, and not a GPU and the RAM)."""
    return f"{host.hostname}/{host.memory_id or host.device}"


def micro_batch_tokens(asked: int | None, hosts: Sequence[Any]) -> int:
    """The pieces a chained step is cut into (cake_py.cluster.micro_batches): as `--micro-batch-tokens` asks, else
    MICRO_BATCH_TOKENS where the workers (their handshakes' HostInfo; the master's HostFacts when it holds layers)
    can compute at the same time: each on a host or GPU of its own, or CPU workers whose threads fit in their host's
    cores. Where they cannot (two on one GPU, or
    more threads than cores) a piece only waits for the other worker's turn, and costs a little more than its share
    of the whole step (a 4-bit layer unpacks its weights once per piece)."""
    if asked is not None:
        return asked
    pools: dict[str, list[Any]] = {}
    for host in hosts:
        pools.setdefault(memory_pool(host), []).append(host)
    for members in pools.values():
        if len(members) > 1 and not (
            all(host.device == "cpu" for host in members)
            and sum(host.threads for host in members) <= members[0].cpu_count
        ):
            return 0
    return MICRO_BATCH_TOKENS


def assignments_of(pipeline: Pipeline) -> set[int]:
    """The assignment numbers the workers of `pipeline` gave its Assigns (random, unique to each Assign)."""
    return {
        stage.connection.assignment
        for stage in pipeline.stages
        if isinstance(stage, RemoteStage) and stage.connection.assignment
    }


def connect_pipeline(
    settings: ServeSettings, source: ModelSource, dtype: torch.dtype, device: str, ours: Collection[int] = ()
) -> Pipeline:
    """The model placed over the workers of `settings` (and this process); `ours`: assignment numbers of this
    master's earlier pipelines, which a worker may still hold (not another master's)."""
    """Handshake every worker, place the layers, stream them, and chain the stages in layer order."""
    n_layers = source.config.n_layers
    check_addresses(settings.workers)
    ranges: dict[str, tuple[int, int]] | None = None
    if any(spec.layers is not None for spec in settings.workers):
        # A bad cluster.yaml is reported before any worker is contacted (an unreachable one would hide it).
        ranges = check_manual({spec.name: spec.layers for spec in settings.workers}, n_layers)
    credentials = channel_credentials(settings.tls_cert, settings.tls_key, settings.tls_ca)
    tls = client_tls(settings.tls_cert, settings.tls_key, settings.tls_ca)
    hosts = [spec.address.rpartition(":")[0] for spec in settings.workers]
    warn_if_key_in_plaintext(settings.cluster_key, credentials is not None, hosts, "the master")
    connections = [
        WorkerConnection(spec, settings.cluster_key, credentials, tls=tls, names=settings.worker_names)
        for spec in settings.workers
    ]
    try:
        replies = _all_at_once(connections, lambda c: c.handshake(settings.connect_timeout), connections)
        _refuse_the_same_worker_twice(connections, replies)
        _adopt_worker_names(connections, replies)
        _warn_of_takeovers(connections, replies, ours)
        if ranges is None:
            nodes = [
                # Workers on one host share its RAM (or one GPU): each reports that memory whole.
                NodeCapacity(
                    conn.spec.name,
                    reply.host.memory_free_bytes,
                    reply.host.tflops,
                    memory_pool=memory_pool(reply.host),
                    held_bytes=reply.held_bytes,
                )
                for conn, reply in zip(connections, replies, strict=True)
            ]
            # The master loads its embedding and head after placement, on memory some workers may share.
            master_pool = f"{socket.gethostname()}/{memory_identity(device)}"
            reserved = {master_pool: ends_bytes(source, dtype, device)}
            ranges = place_automatically(layer_bytes(source, dtype), nodes, reserved)
        config_json = json.dumps(source.weights.config)
        assignments = {
            conn.spec.name: Assignment(source.model_id, config_json, source.weights, *ranges[conn.spec.name], dtype)
            for conn in connections
            if conn.spec.name in ranges and ranges[conn.spec.name][0] < ranges[conn.spec.name][1]
        }
        active = [conn for conn in connections if conn.spec.name in assignments]
        replies_assign = _all_at_once(connections, lambda c: c.assign(assignments[c.spec.name]), active)
        for conn, assigned in zip(active, replies_assign, strict=True):
            log.info(
                "%s holds layers %d-%d (%.1f MB streamed, %.1f MB from its cache, %d ms)",
                conn.label, assigned.layers.start, assigned.layers.end - 1,
                assigned.received_bytes / 1e6, assigned.reused_bytes / 1e6, assigned.load_ms,
            )  # fmt: skip
    except BaseException:  # a worker, or the weights (a bad shard), failed: close every channel opened here
        _drop_what_was_assigned(connections)
        for conn in connections:
            conn.close()
        raise
    for conn, reply in zip(connections, replies, strict=True):
        if conn.spec.name not in assignments:
            if reply.held_bytes:  # placement counted what it holds as free: it must really be freed
                conn.assignment = reply.assignment
                try:
                    conn.unassign()
                except ClusterError as error:
                    log.warning("%s keeps its old layers: %s", conn.label, error)
            conn.close()
    stages: list[Stage] = [RemoteStage(conn, assignments[conn.spec.name]) for conn in active]
    try:
        own = _master_stages(source, dtype, device, [(s.start, s.end) for s in stages])
        stages = sorted([*stages, *own], key=lambda stage: stage.start)
        computing: list[Any] = [reply.host for conn, reply in zip(connections, replies, strict=True) if conn in active]
        if own:  # the master computes pieces too, on its host's cores or GPU
            computing.append(host_facts(device, 0.0))
        return Pipeline(
            load_ends(source, dtype, device),
            stages,
            chain=settings.chain,
            micro_batch_tokens=micro_batch_tokens(settings.micro_batch_tokens, computing),
        )
    except BaseException:
        for stage in stages:  # loading the master's own part failed: stop the monitors, close the channels
            stage.close()
        raise


def _drop_what_was_assigned(connections: list[WorkerConnection]) -> None:
    """The workers whose Assign succeeded before another's failed drop those layers: they freed their old ones for
    them, and held half a model no pipeline would use until some master assigned them again."""
    for conn in connections:
        if conn.assignment:
            try:
                conn.unassign()
            except ClusterError as error:  # gone too: a worker restarted holds nothing anyway
                log.warning("%s keeps its layers of the failed placement: %s", conn.label, error)


def _refuse_the_same_worker_twice(connections: list[WorkerConnection], replies: list[Any]) -> None:
    """Two addresses of one worker (`localhost:10128` and `127.0.0.1:10128`) pass the address check; its answers
    give it away: two stages there would keep re-assigning it from under each other."""
    seen: dict[tuple[str, str, int], WorkerConnection] = {}
    for conn, reply in zip(connections, replies, strict=True):
        identity = (reply.host.hostname, reply.host.worker_name, reply.data_port)
        other = seen.setdefault(identity, conn)
        if other is not conn:
            raise ClusterError(
                f"workers {other.spec.name!r} ({other.spec.address}) and {conn.spec.name!r} ({conn.spec.address}) "
                f"are the same worker, {reply.host.worker_name!r} on {reply.host.hostname}: list it once"
            )


def _adopt_worker_names(connections: list[WorkerConnection], replies: list[Any]) -> None:
    """Workers given by --workers (no names) are shown under the --name they report, when those are unique and none
    is "master", the name of the master's own stages (its card, /health and /metrics would mix the two up)."""
    reported = [reply.host.worker_name for reply in replies]
    adopted = len(set(reported)) == len(reported) and all(reported) and "master" not in reported
    taken = {conn.spec.name for conn in connections if conn.spec.named}
    for conn, name in zip(connections, reported, strict=True):
        if not conn.spec.named:
            shown = name if adopted and name not in taken else None
            if conn.names is not None:
                conn.spec = conn.names.adopt(conn.configured, shown)
            elif shown is not None:
                conn.spec = replace(conn.configured, name=shown)


def _master_stages(
    source: ModelSource, dtype: torch.dtype, device: str, taken: list[tuple[int, int]]
) -> list[LocalStage]:
    """LocalStages for every run of layers no worker holds."""
    held = [False] * source.config.n_layers
    for start, end in taken:
        for layer in range(start, end):
            held[layer] = True
    stages, layer = [], 0
    while layer < len(held):
        if held[layer]:
            layer += 1
            continue
        end = layer
        while end < len(held) and not held[end]:
            end += 1
        model = load_transformer(
            source.weights, source.config, layer, end, with_embedding=False, with_head=False, dtype=dtype, device=device
        )
        stages.append(LocalStage(model, name="master"))
        layer = end
    if stages:
        log.info("master keeps layers %s", ", ".join(f"{s.start}-{s.end - 1}" for s in stages))
    return stages


def _warn_of_takeovers(
    connections: list[WorkerConnection], replies: list[pb.HandshakeReply], ours: Collection[int] = ()
) -> None:
    """Say so when a worker holds layers another master used within TAKEOVER_IDLE_S: this start takes it over
    (a master restarted within that time looks the same), and that master's requests will fail."""
    for conn, reply in zip(connections, replies, strict=True):
        if not reply.assignment or reply.assignment in ours:  # none, or this master's own earlier layers
            continue
        try:
            idle = conn.info().forward_idle_seconds
        except ClusterError:
            continue
        if idle < TAKEOVER_IDLE_S:
            held = f"{reply.model_id} layers {reply.layers.start}-{reply.layers.end - 1}"
            log.warning(
                "%s was serving another master %.0f s ago (%s): this master takes it over, and that one's requests "
                "will fail (if it is still running, give each master its own workers)",
                conn.label, idle, held,
            )  # fmt: skip


def _all_at_once(
    connections: list[WorkerConnection], call: Callable[[WorkerConnection], T], targets: list[WorkerConnection]
) -> list[T]:
    """`call` of each target, all at once. A failure or a Ctrl-C closes every connection before anything waits,
    which ends the calls still under way: a pool's own exit waited for them (a Ctrl-C during a handshake waited out
    --connect-timeout, one during a weight stream the whole stream)."""
    pool = ThreadPoolExecutor(max_workers=max(len(targets), 1))
    try:
        return list(pool.map(call, targets))
    except BaseException:
        for conn in connections:
            conn.close()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def available_workers(
    settings: ServeSettings,
    workers: list[WorkerSpec],
    timeout: float,
    pipeline: Pipeline | None,
    placed: Collection[int] = (),
) -> set[str]:
    """The addresses of the workers a placement may take now: those answering a handshake within `timeout` (with
    the cluster's key and TLS) that are not another master's in use. A worker holding an assignment other than the
    one `pipeline` gave it is taken only once idle for TAKEOVER_IDLE_S, as a reconnecting stage takes it back."""
    ours = {
        stage.connection.spec.address: stage.connection.assignment
        for stage in (pipeline.stages if pipeline is not None else [])
        if isinstance(stage, RemoteStage)
    }

    def available(connection: WorkerConnection) -> bool:
        try:
            reply = connection.handshake(timeout)
            if (
                not reply.assignment
                or reply.assignment == ours.get(connection.spec.address)
                or reply.assignment in placed
            ):
                return True  # nothing, or layers of this master's (`placed`: of its earlier pipelines)
            info = connection.info(timeout)
            return info.status != pb.WORKER_STATUS_LOADING and info.forward_idle_seconds >= TAKEOVER_IDLE_S
        except ClusterError:
            return False

    found = _ask_each(settings, workers, available)
    return {spec.address for spec, ok in zip(workers, found, strict=True) if ok}


def _ask_each(settings: ServeSettings, workers: list[WorkerSpec], ask: Callable[[WorkerConnection], T]) -> list[T]:
    """`ask` of each worker, over a connection of its own made with the cluster's key and TLS, all at once."""
    if not workers:
        return []
    credentials = channel_credentials(settings.tls_cert, settings.tls_key, settings.tls_ca)
    tls = client_tls(settings.tls_cert, settings.tls_key, settings.tls_ca)

    def asking(spec: WorkerSpec) -> T:
        connection = WorkerConnection(spec, settings.cluster_key, credentials, tls=tls, names=settings.worker_names)
        try:
            return ask(connection)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        return list(pool.map(asking, workers))


def probe_workers(settings: ServeSettings, timeout: float) -> list[dict[str, Any]]:
    """What each configured worker is now, asked by handshake, for when no pipeline holds them (no model loaded):
    up and holding no layers ("idle"), holding layers (another master's, or ours not yet released), or down. Each is
    shown under the name the master shows it under (`ServeSettings.worker_names`), which a placement took from the
    worker's --name where no other worker has it."""

    def probe(connection: WorkerConnection) -> dict[str, Any]:
        spec = connection.spec
        node: dict[str, Any] = {"local": False, "name": spec.name, "host": spec.address, "layers": None}
        try:
            reply = connection.handshake(timeout, diagnose=False)
        except ClusterError as error:
            return {**node, **DOWN_FACTS, "status": "down", "healthy": False, "error": str(error)}
        host = reply.host
        if reply.HasField("layers"):
            node.update(layers=[reply.layers.start, reply.layers.end], model_id=reply.model_id)
        return {
            **node,
            "status": "assigned" if reply.HasField("layers") else "idle",
            "healthy": True,
            "error": None,
            **host_description(host),
            **host_details(host),
        }

    return _ask_each(settings, settings.workers, probe)


# What a worker that does not answer cannot say of itself: unknown, but there (the topology's node fields).
DOWN_FACTS: dict[str, Any] = {
    key: None for key in ("description", "vram_bytes", "tflops", "backend", "device", "hostname", "os")
}


def model_bytes(source: ModelSource, dtype: torch.dtype, device: str) -> int:
    """Bytes the whole model takes once loaded on `device` (an estimate: see `loaded_sizes`)."""
    return sum(size for _, size in loaded_sizes(source.weights, dtype, device))


def check_master_holds_all(source: ModelSource, dtype: torch.dtype, device: str, *, held: int = 0) -> None:
    """ClusterError unless this process's free memory, plus the `held` bytes of a model it is about to let go,
    holds the whole model: loading it here alone must not end in the master killed for memory."""
    needed = model_bytes(source, dtype, device)
    _, free = device_memory(device)
    if needed > free + held:
        held_part = f" and {held / 1e9:.1f} GB the current model frees" if held else ""
        raise ClusterError(
            f"{source.model_id} needs {needed / 1e9:.1f} GB on {device} and this master has "
            f"{free / 1e9:.1f} GB free{held_part}, with no worker to take layers"
        )
