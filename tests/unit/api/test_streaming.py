"""SSE and NDJSON lines: one event per line, whatever characters the generated text holds."""

from __future__ import annotations

import json

import pytest

from cake_py.api.streaming import ndjson, sse

# str.splitlines breaks at each of these; JSON without ensure_ascii leaves the last three raw.
ODD = "line\nfeed\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029 é 猫 🎂"


@pytest.mark.parametrize("write", [lambda data: sse(data)[len("data: ") :], ndjson])
def test_an_event_stays_on_one_line_and_keeps_its_text(write: object) -> None:
    line = write({"text": ODD}).rstrip("\n")  # type: ignore[operator]
    assert len(line.splitlines()) == 1
    assert json.loads(line) == {"text": ODD}
    assert "é 猫 🎂" in line  # other text is not escaped


def test_sse_passes_done_through() -> None:
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_a_limit_that_ends_a_stream_ends_its_sequence(tiny_model_factory, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """EventStream.limit (/infill's editor limits): the event it returns finished is the stream's last, and the
    engine stops generating that sequence."""
    import asyncio
    import time
    from dataclasses import replace

    import torch

    from cake_py.api.streaming import EventStream
    from cake_py.cluster.pipeline import local_pipeline
    from cake_py.engine.engine import Engine
    from cake_py.engine.sequence import GenerationEvent
    from cake_py.models.hub import resolve_model
    from cake_py.models.sampling import SamplingParams

    source = resolve_model(str(tiny_model_factory("llama")))
    engine = Engine(local_pipeline(source, torch.float32), source.tokenizer)
    step = engine.step

    def slow_step() -> None:  # 400 steps take 4 s or more: a fast engine could end them before the limit was read
        time.sleep(0.01)
        step()

    monkeypatch.setattr(engine, "step", slow_step)
    engine.start()
    seen: list[GenerationEvent] = []

    def third_ends(event: GenerationEvent) -> GenerationEvent:
        seen.append(event)
        return replace(event, finish_reason="length") if len(seen) == 3 else event

    async def run() -> list[GenerationEvent]:
        stream = EventStream(engine, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        stream.limit = third_ends
        return [event async for event in stream]

    try:
        events = asyncio.run(run())
        deadline = time.monotonic() + 10
        while engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(events) == 3 and events[-1].finish_reason == "length"
        assert engine.in_flight == 0 and engine.stats.tokens_generated < 400
    finally:
        engine.close()


def test_an_anthropic_event_stays_on_one_line_and_keeps_its_text() -> None:
    """Its events were written with json.dumps alone: U+2028 and the like stayed raw, and a client reading lines with
    str.splitlines (httpx's iter_lines) got the event cut in two."""
    from cake_py.api.anthropic_stream import _event

    event = _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": ODD}})
    kind, data = event.rstrip("\n").splitlines()
    assert kind == "event: content_block_delta" and data.startswith("data: ")
    assert json.loads(data[len("data: ") :])["delta"]["text"] == ODD
    assert "é 猫 🎂" in data
