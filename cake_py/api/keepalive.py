"""Keep-alives on streamed answers: a stream that has said nothing for `KEEPALIVE_S` (a long prompt's prefill, a wait
for a slot) writes a line its clients skip, so a proxy or a client with an idle timeout does not drop it.

An SSE stream gets a comment line (the HTML standard's advice for proxies: a comment every 15 seconds or so; the
OpenAI and Anthropic SDKs, browsers' EventSource and the dashboard skip it); Anthropic's stream gets its own `ping`
event. The keep-alive is written by a second task between whole messages of the body, never inside one.
"""

from __future__ import annotations

import asyncio
import time

from starlette.responses import StreamingResponse
from starlette.types import Message, Send

KEEPALIVE_S = 15.0
SSE_COMMENT = b": keep-alive\n\n"


class KeepAliveResponse(StreamingResponse):
    """A StreamingResponse that writes `keepalive` after each `KEEPALIVE_S` of silence (None: never)."""

    keepalive: bytes | None = SSE_COMMENT

    async def stream_response(self, send: Send) -> None:
        keepalive = self.keepalive
        if keepalive is None:
            await super().stream_response(send)
            return
        lock = asyncio.Lock()  # one message at a time: a keep-alive never lands between a message's writes
        last = time.monotonic()
        open_ = False  # the body has begun and not ended: a keep-alive may go

        async def sending(message: Message) -> None:
            nonlocal last, open_
            async with lock:
                await send(message)
                last = time.monotonic()
                open_ = message["type"] == "http.response.start" or bool(message.get("more_body"))

        async def beat() -> None:
            nonlocal last
            try:
                while True:
                    await asyncio.sleep(max(last + KEEPALIVE_S - time.monotonic(), 0.0))
                    async with lock:
                        if time.monotonic() - last >= KEEPALIVE_S:
                            if open_:
                                await send({"type": "http.response.body", "body": keepalive, "more_body": True})
                            last = time.monotonic()
            except Exception:  # the client is gone: the body's own next write meets it and ends the stream
                return

        beating = asyncio.create_task(beat())
        try:
            await super().stream_response(sending)
        finally:
            beating.cancel()
