"""LongRoPE through the engine, against transformers' Phi-3 `generate` (the reference nobody here wrote): a sequence
past the original context is rotated with the long factors, all of it, however the engine computes it.

transformers rotates a forward pass by its largest position + 1, and its Phi-3 `generate` computes a sequence again
from its start, with the long factors, when it first passes the original context. The engine prefills a prompt in
pieces of --max-batch-tokens and copies kept caches: each piece of a long prompt must take the long factors, a
sequence that passes the original context while it decodes is computed again, and caches rotated one way are never
copied into a sequence rotated the other way. The tiny model's original context is 16 positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.cluster.stage import LocalStage
from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.hub import resolve_model
from cake_py.models.kv_cache import Batch
from cake_py.models.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

ORIGINAL = 16


@pytest.fixture(scope="module")
def phi3(tiny_model_factory) -> Path:  # type: ignore[no-untyped-def]
    return tiny_model_factory("phi3-longrope")


@pytest.fixture(scope="module")
def reference(phi3: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(phi3, dtype=torch.float32).eval()


@pytest.fixture
def engine(phi3: Path) -> Iterator[Engine]:
    source = resolve_model(str(phi3))
    pipeline = local_pipeline(source, torch.float32)
    engine = Engine(pipeline, source.tokenizer, max_batch_tokens=8, prefix_cache_tokens=4096)
    engine.start()
    yield engine
    engine.stop()


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ours(
    engine: Engine, prompt: list[int], n: int, prediction: list[int] | None = None
) -> tuple[list[int], GenerationEvent]:
    params = SamplingParams(  # min_tokens as `generate`'s min_new_tokens
        temperature=0.0, max_tokens=n, min_tokens=n, prediction=tuple(prediction) if prediction else None
    )
    tokens, last = [], None
    for event in engine.generate(prompt, params):
        tokens += [token.token_id for token in event.tokens]
        last = event
    assert last is not None and last.finish_reason == "length", last
    return tokens, last


@torch.inference_mode()
def expected(reference: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = reference.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_a_long_prompt_prefilled_in_pieces_is_rotated_as_one_pass_rotates_it(
    engine: Engine, reference: torch.nn.Module
) -> None:
    """24 tokens in pieces of 8: the two pieces within the original context took its short factors (their keys then
    misread by every later query)."""
    prompt = prompt_of(24, seed=1)
    assert ours(engine, prompt, 12)[0] == expected(reference, prompt, 12)


def test_a_sequence_that_decodes_past_the_original_context_is_computed_again(
    engine: Engine, reference: torch.nn.Module
) -> None:
    """12 prompt tokens within the original context, then 20 generated past it: at position 16 transformers computes
    the sequence again with the long factors, and so does the engine."""
    prompt = prompt_of(12, seed=2)
    assert ours(engine, prompt, 20)[0] == expected(reference, prompt, 20)


def test_drafts_stop_at_the_original_context(engine: Engine, reference: torch.nn.Module) -> None:
    """A predicted output drafts up to 8 tokens a step, all of them right here: a step from position 12 would have
    computed positions 13-20 with the short factors' sequence, past the original context."""
    prompt = prompt_of(12, seed=6)
    answer = expected(reference, prompt, 20)
    tokens, last = ours(engine, prompt, 20, prediction=answer)
    assert tokens == answer
    assert last.accepted_prediction_tokens >= 10  # drafted on both sides of position 16


def test_kept_caches_serve_only_prompts_rotated_as_they_were(engine: Engine, reference: torch.nn.Module) -> None:
    """A finished sequence of 16 cached positions (within the original context, short factors) is not copied into a
    24-token prompt that starts with them (long factors); a finished long one is copied into a longer prompt."""
    short_prompt = prompt_of(12, seed=3)
    short_tokens, _ = ours(engine, short_prompt, 5)  # 17 tokens: the last one's keys never computed
    longer = short_prompt + short_tokens[:4] + prompt_of(8, seed=4)  # its first 16 tokens are the kept ones
    tokens, last = ours(engine, longer, 6)
    assert last.cached_tokens == 0
    assert tokens == expected(reference, longer, 6)

    longest = longer + tokens + prompt_of(3, seed=5)  # starts with the long sequence's 29 cached tokens
    tokens, last = ours(engine, longest, 4)
    assert last.cached_tokens == len(longer) + len(tokens) + 1  # what the long one computed (its last token's not)
    assert tokens == expected(reference, longest, 4)


class ReleasedLate(LocalStage):
    """A stage whose releases take effect after its next forward pass, as a worker's do when a Release fails while
    it is up: RemoteStage frees them at its next ping (cake_py/rpc/client.py), whatever ran in between."""

    def __init__(self, stage: LocalStage) -> None:
        super().__init__(stage.model, stage.name)
        self.late: list[int] = []

    def release(self, seq_ids: Sequence[int]) -> None:
        self.late += seq_ids

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        out = super().forward(hidden, batch)
        late, self.late = self.late, []
        self.kv.release(late)
        return out


def test_a_sequence_computed_again_keeps_its_id_s_caches_through_a_late_release(
    phi3: Path, reference: torch.nn.Module
) -> None:
    """Computed again past the original context, a sequence keeps its id: a release of its old caches that reached
    a stage after its first new slice freed the new ones, and its next step failed (the request ended with an
    error). Its caches are rewritten from position 0 instead, as a failover's restart does."""
    source = resolve_model(str(phi3))
    pipeline = local_pipeline(source, torch.float32)
    stage = pipeline.stages[0]
    assert isinstance(stage, LocalStage)
    engine = Engine(Pipeline(pipeline.ends, [ReleasedLate(stage)]), source.tokenizer, max_batch_tokens=8)
    engine.start()
    try:
        prompt = prompt_of(12, seed=7)
        tokens, last = ours(engine, prompt, 10)
    finally:
        engine.stop()
    assert last.error is None
    assert tokens == expected(reference, prompt, 10)
