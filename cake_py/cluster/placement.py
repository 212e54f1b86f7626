"""Layer placement: which contiguous range of layers each worker holds. Pure functions, no I/O.

Manual placement checks the ranges a cluster.yaml gives; automatic placement splits the layers in proportion to
each worker's measured speed, capped by its free memory, in the order the workers are listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cake_py.errors import ClusterError

# Keep this share of a node's free memory for KV caches, activations and the OS.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    free_bytes: int
    tflops: float


def _describe(start: int, end: int) -> str:
    return f"layers {start}-{end - 1}" if end - start > 1 else f"layer {start}"


def check_manual(ranges: dict[str, tuple[int, int] | None], n_layers: int) -> dict[str, tuple[int, int]]:
    """Validate per-worker half-open ranges; layers no worker holds stay on the master."""
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
        if end > n_layers:
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


def place_automatically(layer_bytes: Sequence[int], nodes: Sequence[NodeCapacity]) -> dict[str, tuple[int, int]]:
    """Contiguous ranges in node order, sized by speed share and capped by memory; every layer is placed."""
    n_layers = len(layer_bytes)
    if not nodes:
        raise ClusterError("no workers to place layers on")
    result: dict[str, tuple[int, int]] = {}
    start = 0
    for index, node in enumerate(nodes):
        rest = nodes[index:]
        remaining = n_layers - start
        total_speed = sum(max(n.tflops, 1e-9) for n in rest)
        target = remaining if index == len(nodes) - 1 else round(remaining * max(node.tflops, 1e-9) / total_speed)
        budget = node.free_bytes * MEMORY_HEADROOM
        end, used = start, 0
        while end < n_layers and end - start < target and used + layer_bytes[end] <= budget:
            used += layer_bytes[end]
            end += 1
        result[node.name] = (start, end)
        start = end
    if start < n_layers:
        # Memory capped someone: let nodes after a capped one absorb the rest, re-running without speed targets.
        needed = sum(layer_bytes[start:])
        spare = sum(max(0.0, n.free_bytes * MEMORY_HEADROOM) for n in nodes) - sum(layer_bytes)
        if spare < 0:
            raise ClusterError(
                f"the model needs {sum(layer_bytes) / 1e9:.2f} GB for its layers but the workers have "
                f"{sum(n.free_bytes for n in nodes) * MEMORY_HEADROOM / 1e9:.2f} GB usable: it fits nowhere"
            )
        return _fill_by_memory(layer_bytes, nodes, needed)
    return result


def _fill_by_memory(
    layer_bytes: Sequence[int], nodes: Sequence[NodeCapacity], _needed: int
) -> dict[str, tuple[int, int]]:
    """Greedy contiguous fill, each node taking as many layers as its memory allows."""
    result: dict[str, tuple[int, int]] = {}
    start = 0
    for node in nodes:
        budget, end, used = node.free_bytes * MEMORY_HEADROOM, start, 0
        while end < len(layer_bytes) and used + layer_bytes[end] <= budget:
            used += layer_bytes[end]
            end += 1
        result[node.name] = (start, end)
        start = end
    if start < len(layer_bytes):
        raise ClusterError(
            f"layers {start}-{len(layer_bytes) - 1} fit on no worker: the model does not fit in the cluster's memory"
        )
    return result
