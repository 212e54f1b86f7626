"""One sequence's decode steps replayed as CUDA graphs: one launch for a stage's layers instead of ~30 per layer.

On a GPU a batch-1 decode step of a small model is bound by launching kernels from Python, not by the GPU
(SmolLM2-135M: ~20 ms/token on an H100, eager). A CUDA graph records a step's kernels once and replays them in one
call. Replays need fixed shapes and addresses, so the recorded step (`Transformer.decode_static`) writes the new
keys/values at a position held in a device tensor and attends over the sequence's whole cache, up to its capacity,
masking what lies after the new token. One graph per sequence, recorded on its first decode step and again each
time its caches are reallocated (they grow by doubling, and a sliding window's drops its oldest positions: a replay
writes no further than the buffer's end, and never drops); dropped once the sequence's caches are gone.

Anything else (a prefill, several sequences in a step, a step that grows the caches, a step run again after a
failure) runs eagerly. A recording that fails (out of memory for a moment) makes the next 256 steps eager; after
three failures, every step is.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cake_py.models.kv_cache import KVStore, LayerCache, SequenceSlice

if TYPE_CHECKING:
    from cake_py.models.llama import Transformer

log = logging.getLogger(__name__)

MAX_FAILURES = 3
RETRY_AFTER_STEPS = 256

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
    buffers: tuple[tuple[int, int, int, int], ...]  # each layer's buffers and layout when recorded (see _buffers)
    hidden: torch.Tensor  # (1, hidden): the step's input is copied here
    position: torch.Tensor  # (1,) long: the new token's position
    out: torch.Tensor  # (1, hidden): the step's output, overwritten by each replay
    rope: list[tuple[torch.Tensor, torch.Tensor]]  # the tables the graph reads (per rope), kept alive with it


def _buffers(caches: list[LayerCache]) -> tuple[tuple[int, int, int, int], ...]:
    """What a recorded step reads and writes: replayed only while every layer's caches are these same buffers, holding
    positions from the same start (the step was recorded with it)."""
    return tuple((cache.keys.data_ptr(), cache.values.data_ptr(), cache.keys.shape[2], cache.start) for cache in caches)


def _full(cache: LayerCache, position: int) -> bool:
    """Whether `position` lies past the end of the cache's buffer (which a replay cannot grow)."""
    return position - cache.start >= cache.keys.shape[2]


class DecodeGraphs:
    """The recorded decode steps of one stage's model. Each sequence's graph lives in its KV store beside its
    caches (`KVStore.graphs`), and goes with them when the sequence is released."""

    def __init__(self, model: Transformer) -> None:
        self.model = weakref.ref(model)  # the model holds this object: no cycle to wait for the collector
        self.disabled = False  # after MAX_FAILURES failed recordings: eager for good
        self.failures = 0
        self.steps = 0  # decode steps offered to run()
        self.eager_until = 0  # after a failed recording, steps run eagerly until then (out of memory may pass)
        self.stream: torch.cuda.Stream | None = None  # where steps are recorded, on the model's GPU

    def run(self, hidden: torch.Tensor, piece: SequenceSlice, kv: KVStore) -> torch.Tensor | None:
        """The layers' output for a one-token step of one sequence, replayed; None when it must run eagerly."""
        if self.disabled or piece.n_tokens != 1 or piece.copy_from is not None:
            return None
        if piece.extent > piece.start_pos + 1:  # one token of a longer prompt (a micro-batch cut): LongRoPE rotates
            return None  # it by the whole prompt (rope.slice_rows), a replay by its position alone
        self.steps += 1
        if self.steps < self.eager_until:
            return None
        caches = kv.caches_of(piece.seq_id)  # marks the sequence used (the worker frees idle ones)
        if not caches or piece.start_pos != caches[0].length or any(_full(cache, piece.start_pos) for cache in caches):
            # New, rewound (a step run again) or full (it grows, or a window's drops, eagerly; then recorded again).
            return None
        buffers = _buffers(caches)
        graph = kv.graphs.get(piece.seq_id)
        with torch.cuda.device(hidden.device):  # recorded and replayed on the model's GPU (cuda:N)
            if not isinstance(graph, _Graph) or graph.buffers != buffers:
                try:
                    graph = kv.graphs[piece.seq_id] = self._record(hidden, piece.start_pos, caches, buffers)
                except Exception as error:  # an op that cannot be recorded, out of memory, …
                    self._failed(error)
                    kv.graphs.clear()
                    return None
            else:
                graph.hidden.copy_(hidden)
                graph.position.fill_(piece.start_pos)
                graph.graph.replay()
        for cache in caches:
            cache.length = piece.start_pos + 1
        return graph.out.clone()

    def _failed(self, error: Exception) -> None:
        """Run eagerly for a while and try again (memory may have been short for a moment); after MAX_FAILURES
        failures, for good."""
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            self.disabled = True
            log.warning("cannot record decode steps as CUDA graphs (%s); running them eagerly from now on", error)
        else:
            self.eager_until = self.steps + RETRY_AFTER_STEPS
            log.warning(
                "cannot record decode steps as CUDA graphs; running them eagerly for %d steps",
                RETRY_AFTER_STEPS,
                exc_info=self.failures == 1,  # the first time with its traceback
            )

    def _record(
        self,
        hidden: torch.Tensor,
        position: int,
        caches: list[LayerCache],
        buffers: tuple[tuple[int, int, int, int], ...],
    ) -> _Graph:
        """Record the step at `position` (the warm-up runs it for real: the replay recomputes the same values).

        Not `torch.cuda.graph`: it synchronizes the device and empties the allocator's cache at every recording,
        which is every new sequence's first step."""
        model = self.model()
        if model is None:
            raise RuntimeError("the model is gone")
        rope = model._rope_tables(max(cache.start + cache.keys.shape[2] for cache in caches), hidden)
        static_hidden = hidden.detach().clone()
        static_position = torch.full((1,), position, dtype=torch.long, device=hidden.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(hidden.device)
        current = torch.cuda.current_stream(hidden.device)
        self.stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):  # recording needs a stream of its own
            model.decode_static(static_hidden, static_position, caches)  # warm-up: library handles, kernel choices
            # Its own memory pool (a few MB) per graph: a pool shared between graphs is freed with the last graph
            # that used it, and recording into it afterwards fails. thread_local: CUDA calls of other threads (a
            # handshake reading free memory) do not break the recording.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = model.decode_static(static_hidden, static_position, caches)
            finally:
                graph.capture_end()
        current.wait_stream(self.stream)
        graph.replay()
        return _Graph(graph, buffers, static_hidden, static_position, out, rope)
