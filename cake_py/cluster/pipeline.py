"""The pipeline: the master's embedding and head around an ordered list of stages covering every layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Protocol, runtime_checkable

import torch

from cake_py.cluster.micro_batches import split_batch
from cake_py.cluster.stage import LocalStage, Stage
from cake_py.errors import ClusterError
from cake_py.models.hub import ModelSource
from cake_py.models.kv_cache import Batch
from cake_py.models.llama import Transformer
from cake_py.models.weights import load_transformer

# Tokens per piece of a pipelined step: enough rows that each piece's matmuls stay efficient (and a 4-bit layer
# unpacks its weights for a dense matmul, quant.DENSE_ROWS), few enough that a 512-token step makes 4 pieces.
MICRO_BATCH_TOKENS = 128


@runtime_checkable
class ChainableStage(Protocol):
    """A stage that can hand its output straight to the stages after it (workers on the forward fast path)."""

    def chainable(self) -> bool: ...

    def forward_chain(self, followers: Sequence[Any], hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        """Run this stage and then `followers` in one chained call; returns the output and how many ran."""
        ...

    def forward_pieces(
        self,
        followers: Sequence[Any],
        pieces: Sequence[tuple[torch.Tensor, Batch]],
        lead: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None,
        trail: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None,
    ) -> Any:
        """Run the pieces of one step through this stage and `followers`, all in flight at once (`lead` on each
        before it is sent, `trail` on each output in order): their outputs in order, or None when they could not be
        pipelined (the batch is then run whole)."""
        ...


class Pipeline:
    """Token ids → embedding → stage after stage → final norm + lm_head → logits of the rows asked for.

    Consecutive stages that can chain (remote workers on the fast path, `chain` on) run as one chained call: each
    worker passes its output to the next and the last one answers, one handoff per stage plus one. When the
    workers' stages are one chain, between the master's own stages before and after it (if any), and there are two
    stages or more, a step of at least twice `micro_batch_tokens` tokens (a long prompt's prefill) is cut into
    pieces of about that many (cake_py.cluster.micro_batches), all sent at once: while the second worker computes a
    piece, the first computes the next one, and the master its layers of the ones before and after, instead of
    each waiting for the whole step.
    """

    def __init__(
        self,
        ends: Transformer,
        stages: Sequence[Stage],
        chain: bool = True,
        micro_batch_tokens: int = 0,
    ) -> None:
        covered = 0
        for stage in stages:
            if stage.start != covered:
                raise ClusterError(f"stage {stage.name!r} starts at layer {stage.start}, expected {covered}")
            covered = stage.end
        if covered != ends.config.n_layers:
            raise ClusterError(f"stages cover layers [0, {covered}) of a model with {ends.config.n_layers} layers")
        self.ends = ends
        self.stages = list(stages)
        self.config = ends.config
        # The stages that can ever chain, decided once: whether one can right now is asked per step.
        self._chainers = [stage if chain and isinstance(stage, ChainableStage) else None for stage in self.stages]
        self.micro_batch_tokens = micro_batch_tokens
        # The model's sliding window, if some of its layers have one: it decides where a slice may be cut in pieces.
        self.window = next(filter(None, map(self.config.window_of, range(self.config.n_layers))), None)

    def logits(self, token_ids: torch.Tensor, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        """(T,) ids in the batch's layout → (len(rows), vocab) float32 logits at those token rows."""
        return self.run(token_ids, batch, rows)[0]

    def run(
        self, token_ids: torch.Tensor, batch: Batch, rows: Sequence[int], hidden_rows: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`logits`, and the final hidden states (float32, after the final norm) at `hidden_rows` when any are asked
        for (embeddings): (len(hidden_rows), hidden)."""
        hidden = self.ends.embed(token_ids)
        pipelined = self._pipelined(hidden, batch)
        if pipelined is not None:
            hidden = pipelined
        index = len(self.stages) if pipelined is not None else 0
        while index < len(self.stages):
            run = self._chain_from(index)
            if len(run) > 1:
                hidden, ran = run[0].forward_chain(run[1:], hidden, batch)
            else:
                hidden, ran = self.stages[index].forward(hidden, batch), 1
            index += ran
        final = self.ends.final_hidden(hidden[list(hidden_rows)]) if hidden_rows else None
        return self.ends.head(hidden[list(rows)]), final

    def _pipelined(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """The output of every stage for a step cut into pieces in flight at once, or None when it is not cut: too
        few tokens, stages that are not one chain now (with the master's own before and after it), or a chain that
        cannot take pieces now."""
        if not self.micro_batch_tokens or hidden.shape[0] < 2 * self.micro_batch_tokens or len(self.stages) < 2:
            return None
        first = next((index for index, stage in enumerate(self.stages) if not isinstance(stage, LocalStage)), 0)
        run = self._chain_from(first)
        lead, trail = self.stages[:first], self.stages[first + len(run) :]
        if not run or not all(isinstance(stage, LocalStage) for stage in (*lead, *trail)):
            return None
        cut = split_batch(batch, self.micro_batch_tokens, self.window)
        pieces = [(hidden[start:end], piece) for start, end, piece in cut]
        outputs = run[0].forward_pieces(run[1:], pieces, _as_step(lead, on_sender=True), _as_step(trail))
        return None if outputs is None else torch.cat(outputs)

    def _chain_from(self, start: int) -> list[ChainableStage]:
        """The stages from `start` on that can chain now, up to the first that cannot."""
        run: list[ChainableStage] = []
        for chainer in self._chainers[start:]:
            if chainer is None or not chainer.chainable():
                break
            run.append(chainer)
        return run

    def release(self, seq_ids: Sequence[int]) -> None:
        for stage in self.stages:
            stage.release(seq_ids)

    def healthy(self) -> bool:
        return all(stage.healthy() for stage in self.stages)

    def down_stages(self) -> list[str]:
        """The names of the stages that are down now (cheap: each stage keeps its state, nothing is asked)."""
        return [stage.name for stage in self.stages if not stage.healthy()]

    def down_with_reasons(self, up: Sequence[bool] | None = None) -> str:
        """The stages down now (or not `up`, read once by the caller), each with why ("w2 (refused our cluster
        key)"): a reason the master cannot mend itself (a wrong key, another master) is told to the client, not only
        logged."""
        up = [stage.healthy() for stage in self.stages] if up is None else up
        return ", ".join(
            f"{stage.name} ({reason})" if (reason := getattr(stage, "status_error", "")) else stage.name
            for stage, stage_up in zip(self.stages, up, strict=True)
            if not stage_up
        )

    def not_answering(self) -> list[str]:
        """The names of the stages down, or whose worker does not answer a ping now (all asked at once): before a
        step that cannot be undone (a model switch), not the state of the last ping, which may be a second old."""
        with ThreadPoolExecutor(max(len(self.stages), 1)) as pool:
            answers = list(pool.map(lambda stage: stage.answers(), self.stages))
        return [stage.name for stage, answered in zip(self.stages, answers, strict=True) if not answered]

    def down_workers(self) -> list[str]:
        """The addresses of the workers whose stages are down now."""
        return [stage.address for stage in self.stages if stage.address is not None and not stage.healthy()]

    def worker_addresses(self) -> set[str]:
        return {stage.address for stage in self.stages if stage.address is not None}

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


def _as_step(stages: Sequence[Stage], on_sender: bool = False) -> Callable[[torch.Tensor, Batch], torch.Tensor] | None:
    """The master's own `stages` as one step on a piece of a pipelined step (None when there are none). `on_sender`:
    it runs on the thread sending the pieces, in the caller's grad and inference modes (torch keeps them per
    thread: a cache written there outside inference mode would be a tensor of another kind)."""
    if not stages:
        return None
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def step(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        with torch.inference_mode(inference) if on_sender else nullcontext(), torch.set_grad_enabled(grad):
            for stage in stages:
                hidden = stage.forward(hidden, batch)
        return hidden

    return step


def load_ends(source: ModelSource, dtype: torch.dtype, device: str = "cpu") -> Transformer:
    """The master's own part: embedding, final norm and lm_head, no layers."""
    return load_transformer(
        source.weights, source.config, 0, 0, with_embedding=True, with_head=True, dtype=dtype, device=device
    )


def local_pipeline(source: ModelSource, dtype: torch.dtype, device: str = "cpu") -> Pipeline:
    """Every layer in this process: the single-node engine."""
    n_layers = source.config.n_layers
    layers = load_transformer(
        source.weights, source.config, 0, n_layers, with_embedding=False, with_head=False, dtype=dtype, device=device
    )
    return Pipeline(load_ends(source, dtype, device), [LocalStage(layers)])
