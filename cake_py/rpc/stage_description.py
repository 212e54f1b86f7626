"""A remote stage as the topology and /system/info describe it: its worker, its live figures (the last ping's),
and its host's facts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cake_py.rpc.pb import worker_pb2 as pb

if TYPE_CHECKING:
    from cake_py.rpc.client import RemoteStage


def host_description(host: pb.HostInfo) -> dict[str, Any]:
    """A worker's host facts (from a handshake or a ping) as a node of the topology shows them."""
    return {
        "description": f"{host.backend} {host.hostname}",
        "device": host.device,
        "backend": host.backend,
        "hostname": host.hostname,
        "os": host.os,
        "vram_bytes": host.memory_total_bytes,
        "memory_free_bytes": host.memory_free_bytes,
        "tflops": host.tflops,
        "threads": host.threads,
        "torch_version": host.torch_version,
    }


# Of a worker's host facts, what /system/info adds to the topology's description of it.
HOST_FIELDS = ("accelerator", "cake_version", "python_version", "cpu_count", "ram_total_bytes", "memory_id")


def host_details(host: pb.HostInfo) -> dict[str, Any]:
    """The facts /system/info gives beyond `host_description`: versions, CPU count, RAM, memory pool."""
    return {name: getattr(host, name) for name in HOST_FIELDS}


def describe_remote(stage: RemoteStage) -> dict[str, Any]:
    # The last ping's figures while the worker is up; once down they describe a worker that is gone (its caches,
    # its sequences, its load), so they are unknown (None), not shown as if live.
    up = stage.up  # read once: the monitor thread may mark the worker down or up meanwhile
    info = stage.last_info if up else None
    # Host facts: the last ping's (current free memory), else the handshake's.
    host = info.host if info is not None and info.HasField("host") else stage.connection.host
    node: dict[str, Any] = {
        "local": False,
        "name": stage.name,
        "host": stage.connection.spec.address,
        "status": "up" if up else "down",
        "error": stage.status_error or None,
        "forward_ms": round(stage.stats.forward_ms, 3),
        "round_trip_ms": round(stage.stats.round_trip_ms, 3),
        "hop_ms": round(max(stage.stats.round_trip_ms - stage.stats.forward_ms, 0.0), 3),
        "bytes_sent": stage.stats.bytes_sent,
        "bytes_received": stage.stats.bytes_received,
        "transport": stage.transport,
        "chained_calls": stage.chained_calls,
    }
    if host is not None:
        node.update(host_description(host), memory_free_bytes=host.memory_free_bytes if up else None)
    if info is not None:
        node.update(
            kv_cache_bytes=info.kv_cache_bytes,
            weights_bytes=info.weights_bytes,
            live_sequences=info.live_sequences,
            cpu_percent=info.cpu_percent,
            process_rss_bytes=info.process_rss_bytes,
            memory_used_bytes=info.host.memory_total_bytes - info.host.memory_free_bytes,
        )
    elif not up:
        node.update(
            kv_cache_bytes=None,
            weights_bytes=None,
            live_sequences=None,
            cpu_percent=None,
            process_rss_bytes=None,
            memory_used_bytes=None,
        )
    return node
