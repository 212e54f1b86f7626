"""One sequence's decode steps replayed as CUDA graphs: one launch for a stage's layers instead of ~30 per layer.

On a GPU a batch-1 decode step of a small model is bound by launching kernels from Python, not by the GPU
(SmolLM2-135M: ~20 ms/token on an H100, eager). A CUDA graph records a step's kernels once and replays them in one
call. Replays need fixed shapes and addresses, so the recorded step (`Transformer.decode_static`) writes the new
keys/values at a position held in a device tensor and attends over the sequence's whole cache, up to its capacity,
masking what lies after the new token. One graph per sequence, recorded on its first decode step and again each
time its caches are reallocated (they grow by doubling); dropped once the sequence's caches are gone.

Anything else (a prefill, several sequences in a step, a step that grows the caches, a step run again after a
failure) runs eagerly, and so does everything after a recording that failed (logged once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cake_py.models.kv_cache import KVStore, LayerCache, SequenceSlice

if TYPE_CHECKING:
    from cake_py.models.llama import Transformer

log = logging.getLogger(__name__)

_enabled = True  # --no-cuda-graphs turns it off for the whole process


def set_enabled(on: bool) -> None:
    """Whether models built from now on replay decode steps as CUDA graphs on a GPU."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    buffers: tuple[int, ...]  # the address of every layer's keys when recorded: replayed only while unchanged
    hidden: torch.Tensor  # (1, hidden): the step's input is copied here
    position: torch.Tensor  # (1,) long: the new token's position
    out: torch.Tensor  # (1, hidden): the step's output, overwritten by each replay
    rope: tuple[torch.Tensor, torch.Tensor]  # the tables the graph reads, kept alive with it


class DecodeGraphs:
    """The recorded decode steps of one stage's model, by sequence id."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.graphs: dict[int, _Graph] = {}
        self.disabled = False

    def run(self, hidden: torch.Tensor, piece: SequenceSlice, kv: KVStore) -> torch.Tensor | None:
        """The layers' output for a one-token step of one sequence, replayed; None when it must run eagerly."""
        if self.disabled or piece.n_tokens != 1 or piece.copy_from is not None:
            return None
        caches = kv.caches_of(piece.seq_id)
        if not caches or piece.start_pos != caches[0].length or piece.start_pos >= caches[0].keys.shape[2]:
            return None  # new, rewound (a step run again) or full (it grows eagerly, then is recorded again)
        buffers = tuple(cache.keys.data_ptr() for cache in caches)
        graph = self.graphs.get(piece.seq_id)
        with torch.cuda.device(hidden.device):  # recorded and replayed on the model's GPU (cuda:N)
            if graph is None or graph.buffers != buffers:
                try:
                    graph = self.graphs[piece.seq_id] = self._record(hidden, piece.start_pos, caches, buffers, kv)
                except Exception:  # an op that cannot be recorded, out of memory, …: eager from now on
                    log.warning("cannot record decode steps as CUDA graphs; running them eagerly", exc_info=True)
                    self.disabled = True
                    self.graphs.clear()
                    return None
            else:
                graph.hidden.copy_(hidden)
                graph.position.fill_(piece.start_pos)
                graph.graph.replay()
        for cache in caches:
            cache.length = piece.start_pos + 1
        return graph.out.clone()

    def _record(
        self,
        hidden: torch.Tensor,
        position: int,
        caches: list[LayerCache],
        buffers: tuple[int, ...],
        kv: KVStore,
    ) -> _Graph:
        """Record the step at `position` (the warm-up runs it for real: the replay recomputes the same values)."""
        live = set(kv.sequence_ids())
        for seq_id in [seq_id for seq_id in self.graphs if seq_id not in live]:
            del self.graphs[seq_id]  # finished sequences: their graphs hold memory in the pool
        model = self.model
        rope = model._rope_tables(caches[0].keys.shape[2], hidden)
        static_hidden = hidden.detach().clone()
        static_position = torch.full((1,), position, dtype=torch.long, device=hidden.device)
        side = torch.cuda.Stream(hidden.device)
        side.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(side):  # warm-up off the capture: library handles, kernel choices
            model.decode_static(static_hidden, static_position, caches)
        torch.cuda.current_stream(hidden.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Each graph has its own memory pool (a few MB): a pool shared between graphs is freed with the last graph
        # that used it, and recording into it afterwards fails. thread_local: CUDA calls of other threads (a
        # handshake reading free memory) do not break the recording.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = model.decode_static(static_hidden, static_position, caches)
        graph.replay()
        return _Graph(graph, buffers, static_hidden, static_position, out, rope)
