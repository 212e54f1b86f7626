"""Layer placement: which contiguous range of layers each worker holds. Pure functions, no I/O.

Manual placement checks the ranges a cluster.yaml gives; automatic placement splits the layers in proportion to
each worker's measured speed, capped by its free memory, in the order the workers are listed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from cake_py.errors import ClusterError

# Keep this share of a node's free memory for KV caches, activations and the OS.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    free_bytes: int
    tflops: float
    # Nodes naming the same pool draw on one memory (workers on one host's RAM, or one GPU): each reports it whole.
    memory_pool: str = ""
    # Of free_bytes, what the node's own current layers and caches hold (freed when it is re-assigned).
    held_bytes: int = 0


def _describe(start: int, end: int) -> str:
    return f"layers {start}-{end - 1}" if end - start > 1 else f"layer {start}"


def check_manual(ranges: dict[str, tuple[int, int] | None], n_layers: int | None) -> dict[str, tuple[int, int]]:
    """Validate per-worker half-open ranges; layers no worker holds stay on the master. `n_layers` None (the model
    not known yet) checks all but the range: a stand-in count would be named as the model's."""
    given = {name: r for name, r in ranges.items() if r is not None}
    missing = [name for name, r in ranges.items() if r is None]
    if given and missing:
        raise ClusterError(
            f"worker(s) {', '.join(repr(m) for m in missing)} have no layers while others do: "
            "give every worker layers, or none for automatic placement"
        )
    for name, (start, end) in given.items():
        if start >= end:
            raise ClusterError(f"worker {name!r}: empty layer range")
        if n_layers is not None and end > n_layers:
            raise ClusterError(
                f"worker {name!r}: {_describe(start, end)} out of range (the model has layers 0-{n_layers - 1})"
            )
    ordered = sorted(given.items(), key=lambda item: item[1][0])
    for (name_a, (start_a, end_a)), (name_b, (start_b, end_b)) in zip(ordered, ordered[1:], strict=False):
        if start_b < end_a:
            overlap = (start_b, min(end_a, end_b))
            raise ClusterError(
                f"workers {name_a!r} ({_describe(start_a, end_a)}) and {name_b!r} ({_describe(start_b, end_b)}) "
                f"overlap on {_describe(*overlap)}"
            )
    return given


def place_automatically(
    layer_bytes: Sequence[int], nodes: Sequence[NodeCapacity], reserved: Mapping[str, int] | None = None
) -> dict[str, tuple[int, int]]:
    """Contiguous ranges in node order, sized by speed share and capped by memory; every layer is placed.
    `reserved` is memory already promised in a pool (the master's embedding and head, on its own host's RAM or GPU).

    Each node takes its speed share of the layers left, but no more than its memory holds and no fewer than the
    nodes after it leave uncovered (so a memory-capped node at the end pushes layers forward, onto the fastest of
    the nodes before it that have room, in order).
    """
    n_layers = len(layer_bytes)
    if not nodes:
        raise ClusterError("no workers to place layers on")
    nodes = share_pools(nodes, reserved or {})
    budgets = [node.free_bytes * MEMORY_HEADROOM for node in nodes]
    if sum(layer_bytes) > sum(budgets):
        raise ClusterError(
            f"the model needs {sum(layer_bytes) / 1e9:.2f} GB for its layers but the workers have "
            f"{sum(budgets) / 1e9:.2f} GB usable: it fits nowhere"
        )
    # must_reach[i]: the first layer that nodes i, i+1, ... can hold between them, each filling up from the back.
    must_reach = [n_layers] * (len(nodes) + 1)
    for index in range(len(nodes) - 1, -1, -1):
        begin, used = must_reach[index + 1], 0
        while begin > 0 and used + layer_bytes[begin - 1] <= budgets[index]:
            used += layer_bytes[begin - 1]
            begin -= 1
        must_reach[index] = begin
    if must_reach[0] > 0:
        _raise_unplaced(layer_bytes, budgets)
    result: dict[str, tuple[int, int]] = {}
    start = 0
    for index, node in enumerate(nodes):
        rest = nodes[index:]
        total_speed = sum(max(n.tflops, 1e-9) for n in rest)
        target = start + round((n_layers - start) * max(node.tflops, 1e-9) / total_speed)
        end, used = start, 0
        while end < n_layers and used + layer_bytes[end] <= budgets[index]:  # as far as memory allows
            used += layer_bytes[end]
            end += 1
        end = max(min(target, end), must_reach[index + 1])
        result[node.name] = (start, end)
        start = end
    return result


def share_pools(nodes: Sequence[NodeCapacity], reserved: Mapping[str, int] | None = None) -> list[NodeCapacity]:
    """Split each shared memory pool between its nodes in proportion to their speed (equally without speeds),
    less what `reserved` already promises in that pool."""
    pools: dict[str, list[NodeCapacity]] = {}
    for node in nodes:
        if node.memory_pool:
            pools.setdefault(node.memory_pool, []).append(node)
    shared = []
    for node in nodes:
        members = pools.get(node.memory_pool, [node])
        taken = (reserved or {}).get(node.memory_pool, 0) if node.memory_pool else 0
        if len(members) > 1 or taken:
            # Each reported the pool whole, a moment apart, plus what it holds itself: the pool's free memory is
            # the least of what they saw free, plus everything all of them hold (a restarted master re-places it).
            seen_free = min(member.free_bytes - member.held_bytes for member in members)
            free = max(seen_free + sum(member.held_bytes for member in members) - taken, 0)
            speed = sum(max(member.tflops, 1e-9) for member in members)
            node = replace(node, free_bytes=int(free * max(node.tflops, 1e-9) / speed))
        shared.append(node)
    return shared


def _raise_unplaced(layer_bytes: Sequence[int], budgets: Sequence[float]) -> None:
    """The layers left over when each node in turn takes all its memory holds: enough memory in total, not in
    contiguous pieces."""
    start = 0
    for budget in budgets:
        used = 0
        while start < len(layer_bytes) and used + layer_bytes[start] <= budget:
            used += layer_bytes[start]
            start += 1
    raise ClusterError(
        f"layers {start}-{len(layer_bytes) - 1} fit on no worker: the model does not fit in the cluster's memory"
    )
