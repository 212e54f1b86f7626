"""Bridge from the engine thread to asyncio, and the server-sent-events framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from cake_py.engine.engine import Engine
from cake_py.engine.sequence import GenerationEvent
from cake_py.models.sampling import SamplingParams


class EventStream:
    """Receives one sequence's events on the engine thread and yields them on the event loop.

    Leaving the iteration early (client gone, task cancelled) cancels the sequence, which frees its KV caches on
    every stage.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.finished = False
        self.seq_id = engine.submit(prompt_ids, params, self._sink)

    def _sink(self, event: GenerationEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        try:
            while True:
                event = await self.queue.get()
                yield event
                if event.finished:
                    self.finished = True
                    return
        finally:
            if not self.finished:
                self.engine.cancel(self.seq_id)

    def cancel(self) -> None:
        if not self.finished:
            self.engine.cancel(self.seq_id)


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
