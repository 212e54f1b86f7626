"""The topology document of GET /api/v1/topology: Cake's shape plus live figures."""

from __future__ import annotations

from typing import Any

from cake_py.cluster.hostinfo import HostFacts
from cake_py.cluster.pipeline import Pipeline
from cake_py.models.hub import ModelSource
from cake_py.models.weights import LAYER_PATTERN

_DETAILS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}


def layer_details(source: ModelSource) -> dict[str, dict[str, Any]]:
    """Per layer: its tensors (name, short name, dtype, shape, stored size) and their total (cached per model)."""
    key = (source.model_id, str(source.weights.path))
    if key not in _DETAILS:
        _DETAILS[key] = _layer_details(source)
    return _DETAILS[key]


def _layer_details(source: ModelSource) -> dict[str, dict[str, Any]]:
    details: dict[str, dict[str, Any]] = {}
    weights = source.weights
    for name in weights.names():
        match = LAYER_PATTERN.match(name)
        if not match:
            continue
        layer = f"model.layers.{match.group(1)}"
        info = weights.info(name)
        entry = details.setdefault(layer, {"total_bytes": 0, "tensors": []})
        entry["total_bytes"] += info.size_bytes
        entry["tensors"].append(
            {
                "name": name,
                "short_name": name[len(layer) + 1 :],
                "dtype": info.dtype,
                "shape": list(info.shape),
                "size_bytes": info.size_bytes,
            }
        )
    return dict(sorted(details.items(), key=lambda item: int(item[0].rsplit(".", 1)[1])))


def layer_names(start: int, end: int) -> list[str]:
    return [f"model.layers.{i}" for i in range(start, end)]


def master_node(
    master: HostFacts,
    layers: list[str],
    error: str | None = None,
    forward_ms: float | None = None,
    kv_cache_bytes: int | None = None,
    live_sequences: int | None = None,
) -> dict[str, Any]:
    """The master's node: its host facts, the layers it holds, and its live figures (None: not known, no model)."""
    return {
        "name": "master",
        "device": master.device,
        "backend": master.backend,
        "layers": layers,
        "vram_bytes": master.memory_total_bytes,
        "memory_free_bytes": master.memory_free_bytes,
        "tflops": master.tflops,
        "hostname": master.hostname,
        "os": master.os,
        "status": "down" if error else "up",
        "error": error,
        "forward_ms": forward_ms,
        "kv_cache_bytes": kv_cache_bytes,
        "live_sequences": live_sequences,
    }


def build_topology(
    source: ModelSource,
    model_name: str,
    dtype: str,
    pipeline: Pipeline,
    master: HostFacts,
    live: dict[str, Any],
    master_error: str | None = None,
) -> dict[str, Any]:
    """The document; `master_error` says why the master itself cannot serve (its engine thread died), if it can't."""
    details = layer_details(source)
    total = sum(weights_info.size_bytes for weights_info in map(source.weights.info, source.weights.names()))
    layer_sizes = [entry["total_bytes"] for entry in details.values()]
    master_layers: list[str] = []
    master_forward_ms = 0.0
    master_kv_bytes = 0
    master_sequences = 0
    workers = []
    for stage in pipeline.stages:
        node = stage.describe()
        if node.get("local"):
            master_layers += layer_names(stage.start, stage.end)
            master_forward_ms += stage.stats.forward_ms
            master_kv_bytes += node.get("kv_cache_bytes", 0)
            # Every stage holds caches for the same sequences: the most any holds is how many the master holds.
            master_sequences = max(master_sequences, node.get("live_sequences", 0))
            continue
        node["layers"] = layer_names(stage.start, stage.end)
        workers.append(node)
    return {
        "model": model_name,
        "model_id": source.model_id,
        "dtype": dtype,
        "num_layers": source.config.n_layers,
        "memory_bytes": total,
        "layer_size_bytes": int(sum(layer_sizes) / len(layer_sizes)) if layer_sizes else 0,
        "master": master_node(
            master, master_layers, master_error, master_forward_ms, master_kv_bytes, master_sequences
        ),
        "workers": workers,
        "layer_details": details,
        "live": live,
    }
