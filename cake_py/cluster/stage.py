"""A pipeline stage is "layers [start, end) of the model", wherever they run; LocalStage runs them in-process.

Every stage answers the same protocol, so the engine never knows which layers are remote.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from cake_py.models.kv_cache import Batch
from cake_py.models.llama import Transformer


@dataclass
class StageStats:
    """Live figures of one stage, for topology, metrics and the dashboard."""

    calls: int = 0
    forward_ms: float = 0.0  # exponential moving average of the stage's own compute time
    round_trip_ms: float = 0.0  # moving average of the whole call as seen by the master (remote stages)
    bytes_sent: int = 0
    bytes_received: int = 0

    def record(self, forward_ms: float, round_trip_ms: float = 0.0, sent: int = 0, received: int = 0) -> None:
        weight = 0.1 if self.calls else 1.0
        self.forward_ms += weight * (forward_ms - self.forward_ms)
        self.round_trip_ms += weight * (round_trip_ms - self.round_trip_ms)
        self.calls += 1
        self.bytes_sent += sent
        self.bytes_received += received


class Stage(Protocol):
    name: str
    start: int
    end: int
    stats: StageStats
    address: str | None  # the worker's HOST:PORT as configured; None for the master's own layers

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(T, hidden) in → (T, hidden) out, extending each sequence's KV caches on this stage."""
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the KV caches of these sequences."""
        ...

    def healthy(self) -> bool: ...

    def answers(self) -> bool:
        """Whether it is up and answers now (asks a worker: `healthy` is only as fresh as the last ping)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The node this stage runs on, for topology: `local` True for the master's own layers."""
        ...

    def close(self) -> None: ...


class LocalStage:
    """Layers run by this process on its own torch device."""

    def __init__(self, model: Transformer, name: str = "master") -> None:
        self.model = model
        self.name = name
        self.address: str | None = None
        self.start, self.end = model.start, model.end
        self.kv = model.new_kv_store()
        self.stats = StageStats()

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        began = time.perf_counter()
        out = self.model.forward_layers(hidden, batch, self.kv)
        if out.is_cuda:  # the GPU's time, not only the launches' (the head waits for it anyway)
            torch.cuda.synchronize(out.device)
        self.stats.record((time.perf_counter() - began) * 1000)
        return out

    def release(self, seq_ids: Sequence[int]) -> None:
        self.kv.release(seq_ids)

    def healthy(self) -> bool:
        return True

    def answers(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "local": True,
            "name": self.name,
            "status": "up",
            "forward_ms": round(self.stats.forward_ms, 3),
            "kv_cache_bytes": self.kv.nbytes,
            "live_sequences": len(self.kv.sequence_ids()),
        }

    def close(self) -> None:
        self.kv.release(self.kv.sequence_ids())
