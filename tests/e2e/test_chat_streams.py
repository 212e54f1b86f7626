"""The dashboard's chat against streams that are not a plain answer, in headless Chromium: a reasoning model's
thinking (`reasoning_content`), very long replies, errors, malformed events and a connection lost mid-reply."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from cake_py.api.streaming import GenerationResponse
from tests.fixtures.browser import fresh_page, send_message
from tests.fixtures.server import running_server, slow_steps, tiny_settings


def _sse(chunks: list[dict[str, Any]]) -> str:
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def _delta(**delta: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _finish(reason: str, completion_tokens: int) -> dict[str, Any]:
    return {
        "choices": [{"index": 0, "delta": {}, "finish_reason": reason}],
        "usage": {"completion_tokens": completion_tokens},
    }


def test_a_reasoning_models_thinking_is_shown_and_counted(browser: Browser, tiny_llama_reasoning: Path) -> None:
    """Its reasoning_content was dropped: a reply still thinking at max_tokens showed nothing, the rate read "–" and
    the question said "no answer came" though the model wrote every token it was allowed."""
    with running_server(tiny_settings(tiny_llama_reasoning)) as server:
        with fresh_page(browser) as (page, problems):  # closed before the server stops: no refused poll
            page.goto(f"{server.base_url}/#chat")
            page.fill("#temperature", "0")  # greedy: sampled at the page's 0.7, it could end or close <think> early
            page.fill("#max-tokens", "20")
            send_message(page, "hello")
            reply = page.get_by_test_id("assistant-message").last
            expect(reply).to_have_attribute("data-state", "max tokens", timeout=20_000)
            # The random tiny model never closes its <think>: all 20 tokens are thinking.
            expect(reply.locator(".thinking .thought")).not_to_be_empty()
            expect(reply.locator(".content")).to_have_text("")
            expect(page.locator("#chat-tokens")).to_have_text("20")
            expect(page.get_by_test_id("user-message").last.locator(".meta")).to_contain_text("after the thinking")
        assert problems == []


def test_thinking_stays_out_of_the_conversation_sent_back(page: Page, tiny_llama: Path) -> None:
    stream = _sse(
        [
            _delta(role="assistant", content=""),
            _delta(reasoning_content="The user asks <b>where</b>."),
            _delta(reasoning_content=" France's capital."),
            _delta(content="Paris"),
            _finish("stop", 4),
        ]
    )
    bodies: list[Any] = []

    def answer(route: Any) -> None:
        bodies.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=stream)

    with running_server(tiny_settings(tiny_llama)) as server:
        page.route("**/v1/chat/completions", answer)
        page.goto(f"{server.base_url}/#chat")
        send_message(page, "Capital of France?")
        reply = page.get_by_test_id("assistant-message").last
        expect(reply).to_have_attribute("data-state", "done")
        expect(reply.locator(".thought")).to_have_text("The user asks <b>where</b>. France's capital.")
        assert reply.locator(".thought *").count() == 0  # model text, never markup
        expect(reply.locator(".content")).to_have_text("Paris")
        expect(page.locator("#chat-tokens")).to_have_text("4")

        send_message(page, "And Italy?")
        expect(page.get_by_test_id("assistant-message")).to_have_count(2)
        assert bodies[-1]["messages"][1] == {"role": "assistant", "content": "Paris"}


def test_a_long_reply_that_comes_in_a_burst_does_not_freeze_the_page(page: Page, tiny_llama: Path) -> None:
    """Every delta re-set the whole reply's text and measured the list, so the browser laid the reply out again at
    each one: 5,000 deltas arriving together (a fast cluster, a slow tab) took the page about 40 s, 20,000 minutes."""
    n = 5000
    words = [f"word{i} " for i in range(n)]
    stream = _sse([_delta(role="assistant", content=""), *(_delta(content=w) for w in words), _finish("length", n)])
    with running_server(tiny_settings(tiny_llama)) as server:
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=stream),
        )
        page.goto(f"{server.base_url}/#chat")
        send_message(page, "Count to five thousand.")
        reply = page.get_by_test_id("assistant-message").last
        expect(reply).to_have_attribute("data-state", "max tokens", timeout=10_000)
        assert reply.locator(".content").text_content() == "".join(words)
        expect(page.locator("#chat-tokens")).to_have_text(str(n))
        distance = "(l => l.scrollHeight - l.scrollTop - l.clientHeight)(document.getElementById('messages'))"
        assert page.evaluate(distance) <= 40  # it followed the reply to its end


def test_an_error_is_announced(browser: Browser, tiny_llama: Path) -> None:
    """The chat's error banner was no live region: a screen reader never said why a reply did not come."""
    with running_server(tiny_settings(tiny_llama)) as server:
        with fresh_page(browser) as (page, problems):
            page.route(
                "**/v1/chat/completions",
                lambda route: route.fulfill(
                    status=503, headers={"Content-Type": "application/json"}, body='{"error": "the cluster is busy"}'
                ),
            )
            page.goto(f"{server.base_url}/#chat")
            send_message(page, "hello")
            expect(page.get_by_role("alert")).to_have_text("the cluster is busy")
        assert [p for p in problems if "status of 503" not in p] == []


def test_a_reply_sent_with_the_send_button_can_be_stopped_from_the_keyboard(page: Page, tiny_llama: Path) -> None:
    """Send hides while a reply streams, and focus on it fell to the page: a keyboard user who sent with the button
    had to find Stop again (and Escape works only in the message box)."""
    with running_server(tiny_settings(tiny_llama)) as server:
        page.goto(f"{server.base_url}/#chat")
        page.evaluate(  # a fetch whose body stays open until it is aborted, as a slow reply's does
            """() => {
                const real = window.fetch;
                window.fetch = (url, init) => url.includes("/chat/completions")
                    ? Promise.resolve(new Response(new ReadableStream({ start(c) {
                        init.signal.addEventListener("abort", () => c.error(new DOMException("stopped", "AbortError")));
                      } }), { headers: { "Content-Type": "text/event-stream" } }))
                    : real(url, init);
            }"""
        )
        page.fill("#prompt", "hello")
        page.focus("#send")
        page.keyboard.press("Enter")
        expect(page.locator("#stop")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "stopped")
        expect(page.locator("#prompt")).to_be_focused()


def test_a_malformed_event_is_not_called_a_lost_connection(page: Page, tiny_llama: Path) -> None:
    """`data: null` made reading the chunk throw a TypeError, and every TypeError read as "the server stopped
    answering": the page blamed the connection for a reply it could not read. Now it says what was malformed, and
    a connection that does drop mid-reply still says so."""
    first = f"data: {json.dumps(_delta(role='assistant', content='Hel'))}\n\n"
    cases = {
        "null": "an event is null, not a JSON object",
        "{oops": "an event is not JSON",
        "[1, 2]": "an event is an array",
        json.dumps(_delta(content=7)): "delta.content is a number, not a string",
        json.dumps({"choices": "none"}): "choices is a string",
    }
    events: list[str] = []
    with running_server(tiny_settings(tiny_llama)) as server:
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(
                status=200, headers={"Content-Type": "text/event-stream"}, body=f"{first}data: {events[-1]}\n\n"
            ),
        )
        page.goto(f"{server.base_url}/#chat")
        alert = page.get_by_role("alert")
        for event, said in cases.items():
            events.append(event)
            send_message(page, "hello")
            reply = page.get_by_test_id("assistant-message").last
            expect(reply).to_have_attribute("data-state", "error")
            expect(alert).to_contain_text("The server sent a malformed reply")
            expect(alert).to_contain_text(said)
            expect(alert).not_to_contain_text("stopped answering")

        page.unroute("**/v1/chat/completions")
        page.evaluate(  # a body that gives one token, then fails as a dropped connection does
            """first => {
                const real = window.fetch;
                window.fetch = (url, init) => url.includes("/chat/completions")
                    ? Promise.resolve(new Response(new ReadableStream({ start(c) {
                        c.enqueue(new TextEncoder().encode(first));
                        setTimeout(() => c.error(new TypeError("network error")), 50);
                      } }), { headers: { "Content-Type": "text/event-stream" } }))
                    : real(url, init);
            }""",
            first,
        )
        send_message(page, "hello")
        expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "error")
        expect(alert).to_contain_text("The server stopped answering")


# Each chat request's body stays open, written to by `_push` from the test, until `_push(page, None)` ends it.
HELD_REPLY = """() => {
    const real = window.fetch;
    window.fetch = (url, init) => url.includes("/chat/completions")
        ? Promise.resolve(new Response(new ReadableStream({ start(c) { window.__reply = c; } }),
            { headers: { "Content-Type": "text/event-stream" } }))
        : real(url, init);
}"""


def _push(page: Page, text: str | None) -> None:
    if text is None:
        page.evaluate("() => { try { window.__reply.close(); } catch {} }")  # unless the page cancelled it
    else:
        page.evaluate("text => window.__reply.enqueue(new TextEncoder().encode(text))", text)


DISTANCE_TO_END = "(l => l.scrollHeight - l.scrollTop - l.clientHeight)(document.getElementById('messages'))"


def test_a_finished_replys_status_line_is_scrolled_into_view(page: Page, tiny_llama: Path) -> None:
    """The list followed the reply's text to its end and only then wrote its status line ("2 tokens · … · max
    tokens", "· error") under it: the line was left half below the list. A reader who scrolled up stays put."""
    with running_server(tiny_settings(tiny_llama)) as server:
        page.goto(f"{server.base_url}/#chat")
        page.evaluate(HELD_REPLY)
        page.evaluate(  # an earlier conversation taller than the list, so that it scrolls
            """() => {
                const earlier = document.createElement("div");
                earlier.style.minHeight = "3000px";
                document.getElementById("messages").append(earlier);
            }"""
        )
        endings = {
            "max tokens": _sse([_delta(content="Paris"), _finish("length", 2)]),
            "error": 'data: {"error": "boom"}\n\n',
        }
        for state, ending in endings.items():
            send_message(page, "Capital of France?")
            reply = page.get_by_test_id("assistant-message").last
            _push(page, ending)
            _push(page, None)
            expect(reply).to_have_attribute("data-state", state)
            expect(reply.locator(".meta")).to_contain_text(state)
            assert page.evaluate(DISTANCE_TO_END) <= 1, f"the end of a reply that ended with {state} is out of view"

        send_message(page, "And of Italy?")
        reply = page.get_by_test_id("assistant-message").last
        _push(page, _sse([_delta(content="Rome")]).removesuffix("data: [DONE]\n\n"))
        expect(reply.locator(".content")).to_have_text("Rome")
        page.evaluate("document.getElementById('messages').scrollTop = 100")  # the reader scrolls up to read
        _push(page, f"data: {json.dumps(_finish('stop', 1))}\n\ndata: [DONE]\n\n")
        _push(page, None)
        expect(reply).to_have_attribute("data-state", "done")
        assert page.evaluate("document.getElementById('messages').scrollTop") == 100  # no jump to the end


def test_a_finished_reply_is_no_failed_request_and_stop_still_cancels(
    browser: Browser, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page cancelled the body as soon as it read `data: [DONE]`, before the body's end: every reply that came
    whole showed in DevTools as a failed request (net::ERR_ABORTED). Stop still cancels the reply on the server."""
    make = GenerationResponse.__init__

    def ends_later(self: GenerationResponse, content: AsyncIterator[str], *args: Any, **kwargs: Any) -> None:
        async def then_a_pause() -> AsyncIterator[str]:
            async for chunk in content:
                yield chunk
            await asyncio.sleep(0.5)  # the body ends a moment after [DONE]: a page that cancels it is surely early

        make(self, then_a_pause(), *args, **kwargs)

    monkeypatch.setattr(GenerationResponse, "__init__", ends_later)
    with running_server(tiny_settings(tiny_llama)) as server:
        with fresh_page(browser) as (page, problems):
            failed: list[str] = []
            page.on("requestfailed", lambda request: failed.append(f"{request.url}: {request.failure}"))
            page.goto(f"{server.base_url}/#chat")
            page.fill("#temperature", "0")  # greedy: sampled, the random model may end before its 4 tokens
            page.fill("#max-tokens", "4")
            send_message(page, "hello")
            reply = page.get_by_test_id("assistant-message").last
            expect(reply).to_have_attribute("data-state", "max tokens")
            assert failed == []

            engine = server.state.engine
            assert engine is not None
            slow_steps(monkeypatch, server, 0.05)  # 400 tokens would take 20 s: time to press Stop
            page.fill("#max-tokens", "400")
            send_message(page, "hello")
            expect(page.locator("#chat-tokens")).not_to_have_text(re.compile(r"^[0-2]$"), timeout=10_000)
            page.click("#stop")
            expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "stopped")
            deadline = time.monotonic() + 5
            # page.wait_for_timeout, not time.sleep: Playwright delivers the requestfailed event only while it runs
            while (engine.in_flight or not failed) and time.monotonic() < deadline:
                page.wait_for_timeout(50)
            assert engine.in_flight == 0, "the server kept generating after Stop"
            assert len(failed) == 1 and "ERR_ABORTED" in failed[0], failed  # the stopped reply, cancelled
        assert problems == []


def test_a_request_past_the_context_names_what_to_shorten(browser: Browser, tiny_llama: Path) -> None:
    """The page always advised "Start a New chat, or a shorter conversation", which cannot help a conversation of one
    turn: a New chat sends the same system prompt and message again."""
    too_long = "word " * 700  # past the tiny model's context
    with running_server(tiny_settings(tiny_llama)) as server:
        with fresh_page(browser) as (page, problems):
            page.goto(f"{server.base_url}/#chat")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "2")
            error = page.locator("#chat-error")
            send_message(page, too_long)
            expect(error).to_contain_text("Shorten this message")
            expect(error).not_to_contain_text("New chat")

            page.fill("#prompt", "")
            page.fill("#system-prompt", too_long)
            send_message(page, "hello")
            expect(error).to_contain_text("Shorten the system prompt (in Settings) or this message")
            expect(error).not_to_contain_text("New chat")

            page.fill("#system-prompt", "")
            page.fill("#prompt", "")
            send_message(page, "hello")
            expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "max tokens")
            send_message(page, too_long)  # a second turn: leaving the first behind helps
            expect(error).to_contain_text("Start a New chat, or a shorter conversation")
        assert [p for p in problems if "status of 400" not in p] == []


def test_a_key_that_cannot_be_sent_opens_the_key_field(page: Page, tiny_llama: Path) -> None:
    """A key with a pasted typographic dash was refused with a clear message, but unlike a key the server refuses,
    Settings stayed closed and focus went to the message box: the field to fix was left to be found. Now it is
    refused before the message is sent, as a bad number in Settings is, and the key field is opened and focused."""
    with running_server(tiny_settings(tiny_llama)) as server:
        page.goto(f"{server.base_url}/#chat")
        page.fill("#api-key", "ses\u2011ame")  # a non-breaking hyphen: no header can carry it
        page.evaluate("document.getElementById('settings').open = false")  # as on a phone
        send_message(page, "hello")
        expect(page.get_by_role("alert")).to_contain_text("API key has a character that cannot be sent")
        expect(page.locator("#settings")).to_have_attribute("open", "")
        expect(page.locator("#api-key")).to_be_focused()
        expect(page.locator("#prompt")).to_have_value("hello")  # kept, to send once the key is fixed
        expect(page.locator(".message")).to_have_count(0)

        page.fill("#api-key", "sesame")
        page.fill("#max-tokens", "2")
        send_message(page, "hello")
        expect(page.get_by_test_id("assistant-message").last).not_to_have_attribute("data-state", "streaming")
        expect(page.get_by_role("alert")).to_be_hidden()
