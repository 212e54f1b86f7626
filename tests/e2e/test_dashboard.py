"""The web dashboard in real headless Chromium (Debian's, driven by Playwright) against a live master with two real
`cake worker` processes serving the tiny Llama.

What a person sees: both workers with their layer ranges, a layer's tensors, live figures that move without a
reload, a chat that streams token by token and keeps the conversation, a stop button that cancels the generation
on the server (and frees it on every worker), model output shown as text even when it looks like HTML, an API key
field that the server's key check accepts, view tabs that follow the arrow keys, a phone-sized screen without
sideways scrolling, a master that stops answering and a killed worker's card both shown within 5 s. Screenshots of
every view go to `test-artifacts/dashboard/`.

The last test kills a worker of the module's cluster, so it stays last in the file.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from cake_py.api import management
from cake_py.engine.engine import Engine
from tests.fixtures.browser import PHONE, fresh_page, send_message
from tests.fixtures.cluster import LocalCluster, WorkerProcess
from tests.fixtures.server import ServerHandle, running_server, tiny_settings

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
PROMPT = "What is the capital of France?"


@dataclass
class Cluster:
    server: ServerHandle
    workers: dict[str, WorkerProcess]

    @property
    def url(self) -> str:
        return f"{self.server.base_url}/"

    @property
    def engine(self) -> Engine:
        assert self.server.state.engine is not None
        return self.server.state.engine

    def topology(self) -> dict[str, Any]:
        response = httpx.get(f"{self.server.base_url}/api/v1/topology", timeout=10)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A master (in this process, so tests can read its engine) over worker-1 (layers 0-1) and worker-2 (layer 2)."""
    with LocalCluster(tmp_path_factory.mktemp("dashboard-cluster")) as processes:
        worker_1, worker_2 = processes.start_workers(2)
        specs = [worker_1.spec((0, 2)), worker_2.spec((2, 3))]
        with running_server(tiny_settings(tiny_llama, workers=specs, model_name="tiny-llama")) as server:
            yield Cluster(server, {worker.name: worker for worker in (worker_1, worker_2)})


# ---- the browser -------------------------------------------------------------------------------------------------


def _screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # else the sticky header is drawn mid-page in a full-page shot
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@pytest.fixture()
def throttle(monkeypatch: pytest.MonkeyPatch) -> Callable[[Engine, float], None]:
    """Slow an engine to one step per `seconds`, so a reply takes long enough to watch arrive and to stop."""

    def apply(engine: Engine, seconds: float) -> None:
        step = engine.step

        def slow_step() -> None:
            time.sleep(seconds)
            step()

        monkeypatch.setattr(engine, "step", slow_step)

    return apply


@pytest.fixture()
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Engine, float], threading.Event]]:
    """Hold an engine's steps until the returned event is set, then run one per `seconds`: a reply that is surely
    still under way while the test looks at it, however fast or loaded the machine (a throttled 12-token reply
    could end before a loaded machine's browser was looked at). Set again at teardown: no step is left waiting."""
    gates: list[threading.Event] = []

    def apply(engine: Engine, seconds: float) -> threading.Event:
        step, gate = engine.step, threading.Event()
        gates.append(gate)

        def held_step() -> None:
            gate.wait(timeout=60)
            time.sleep(seconds)
            step()

        monkeypatch.setattr(engine, "step", held_step)
        return gate

    yield apply
    for gate in gates:
        gate.set()


def _watch_text(page: Page, selector: str) -> None:
    """Record, in window.__lengths, the text length of the last element matching `selector` at every DOM change."""
    page.evaluate(
        """selector => {
            window.__lengths = [];
            new MutationObserver(() => {
                const nodes = document.querySelectorAll(selector);
                if (nodes.length) window.__lengths.push(nodes[nodes.length - 1].textContent.length);
            }).observe(document.body, { childList: true, subtree: true, characterData: true });
        }""",
        selector,
    )


def _greedy_reply(cluster: Cluster, messages: list[dict[str, str]], max_tokens: int) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{cluster.server.base_url}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


# ---- cluster view ------------------------------------------------------------------------------------------------


def test_cluster_view_draws_the_pipeline_with_both_workers_and_their_layers(page: Page, cluster: Cluster) -> None:
    topology = cluster.topology()
    page.goto(cluster.url)

    worker_1, worker_2 = page.get_by_test_id("node-worker-1"), page.get_by_test_id("node-worker-2")
    expect(worker_1).to_contain_text("layers 0–1 (2)")
    expect(worker_2).to_contain_text("layers 2 (1)")
    expect(page.get_by_test_id("node-master")).to_contain_text("no transformer layers")
    # Drawn in the order a token travels: master, then the workers in layer order.
    order = page.locator("#pipeline [data-node]").evaluate_all("nodes => nodes.map(n => n.dataset.node)")
    assert order == ["master", "worker-1", "worker-2"]

    for name, card in (("worker-1", worker_1), ("worker-2", worker_2)):
        node = next(w for w in topology["workers"] if w["name"] == name)
        expect(card).to_have_attribute("data-status", "up")
        expect(card.locator(".status")).to_have_text("up")
        expect(card).to_contain_text(cluster.workers[name].address)
        expect(card).to_contain_text(node["device"])
        expect(card).to_contain_text(node["os"])
        expect(card.locator(".mem-label")).to_have_text(
            re.compile(r"^\d+(\.\d)? [KMGT]?B of \d+(\.\d)? [KMGT]?B used$")
        )
        width = card.locator(".memory .fill").evaluate("bar => bar.style.width")
        assert 0 < float(width.rstrip("%")) <= 100

    # A layer expands to its tensors: every tensor of the layer, with dtype, shape and size.
    tensors = topology["layer_details"]["model.layers.1"]["tensors"]
    worker_1.locator(".chip", has_text="1").click()
    table = worker_1.locator('.tensor-block[data-layer="model.layers.1"]')
    expect(table.locator("tbody tr")).to_have_count(len(tensors))
    q_proj = next(t for t in tensors if t["short_name"] == "self_attn.q_proj.weight")
    row = table.locator("tr", has_text="self_attn.q_proj.weight")
    expect(row).to_contain_text(q_proj["dtype"])
    expect(row).to_contain_text(" × ".join(str(d) for d in q_proj["shape"]))
    # ...and stays open across the next refreshes (cards are updated in place, not redrawn).
    page.wait_for_timeout(2500)
    expect(table).to_be_visible()
    _screenshot(page, "cluster.png")

    worker_1.locator(".chip", has_text="1").click()
    expect(table).to_have_count(0)


def test_live_figures_refresh_without_a_reload(
    page: Page, cluster: Cluster, throttle: Callable[[Engine, float], None]
) -> None:
    page.goto(cluster.url)
    expect(page.get_by_test_id("node-worker-1")).to_have_attribute("data-status", "up")
    page.evaluate("window.__sameDocument = true")
    before = cluster.topology()["live"]["requests_total"]
    expect(page.locator("#sum-total")).to_have_text(str(before))

    throttle(cluster.engine, 0.05)
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{cluster.server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"content"' in line)  # generating now
        expect(page.locator("#live-in-flight")).to_have_text("1", timeout=3000)
        expect(page.locator("#sum-in-flight")).to_have_text("1")
        expect(page.locator("#live-tps")).not_to_have_text(re.compile(r"^(0\.0|–)$"), timeout=3000)
        for _ in lines:
            pass

    expect(page.locator("#sum-total")).to_have_text(str(before + 1), timeout=3000)
    expect(page.locator("#live-in-flight")).to_have_text("0", timeout=3000)
    # Per-stage forward time and per-hop round trip, measured by the master, now show on the cards and arrows.
    for name in ("worker-1", "worker-2"):
        expect(page.get_by_test_id(f"node-{name}").locator(".metric", has_text="forward")).not_to_have_text(
            re.compile(r"^0\.0 ms")
        )
        hop = page.locator(f'.hop[data-to="{name}"]')
        expect(hop).to_contain_text("round trip")
        expect(hop.locator("b")).to_have_text(re.compile(r"^\d+(\.\d)? ms$"))
        expect(hop.locator("b")).not_to_have_text("0.0 ms")
    assert page.evaluate("window.__sameDocument") is True


# ---- chat view ---------------------------------------------------------------------------------------------------


def test_chat_streams_a_reply_and_keeps_the_conversation(
    page: Page, cluster: Cluster, held: Callable[[Engine, float], threading.Event]
) -> None:
    max_tokens = 40
    expected = _greedy_reply(cluster, [{"role": "user", "content": PROMPT}], max_tokens)
    go_on = held(cluster.engine, 0.03)  # one token per network read: the text must be seen to grow
    page.goto(f"{cluster.url}#chat")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    _watch_text(page, '[data-testid="assistant-message"] .content')
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request) if request.method == "POST" else None)

    send_message(page, PROMPT)
    reply = page.get_by_test_id("assistant-message").last
    expect(reply).to_have_attribute("data-state", "streaming")
    expect(page.locator("#stop")).to_be_visible()  # seen during the reply: its steps wait for go_on
    go_on.set()
    expect(reply.locator(".content")).not_to_be_empty()
    expect(reply).to_have_attribute("data-state", "max tokens", timeout=20_000)

    assert reply.locator(".content").text_content() == expected  # the streamed deltas add up to the reply
    lengths = page.evaluate("window.__lengths")
    growing = sorted({n for n in lengths if 0 < n < len(expected)})
    assert len(growing) >= 5, f"the reply did not arrive incrementally: text lengths seen {lengths}"
    assert page.locator("#chat-tokens").text_content() == str(max_tokens)
    assert float(page.locator("#chat-tps").text_content() or "0") > 0
    expect(reply.locator(".meta")).to_contain_text(f"{max_tokens} tokens")
    expect(page.locator("#send")).to_be_visible()

    # The second turn carries the whole conversation, the system prompt first.
    page.fill("#system-prompt", "You answer in one word.")
    page.fill("#max-tokens", "8")
    send_message(page, "And of Italy?")
    expect(page.get_by_test_id("assistant-message")).to_have_count(2)
    expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "max tokens", timeout=20_000)
    sent = requests[-1].post_data_json
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 8
    assert sent["messages"] == [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "And of Italy?"},
    ]
    _screenshot(page, "chat.png")


def test_stop_button_cancels_the_generation_on_the_server(
    page: Page, cluster: Cluster, throttle: Callable[[Engine, float], None]
) -> None:
    engine = cluster.engine
    throttle(engine, 0.05)  # 400 tokens would take 20 s: long enough to press stop in the middle
    page.goto(f"{cluster.url}#chat")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "400")
    send_message(page, PROMPT)

    expect(page.locator("#chat-tokens")).not_to_have_text(re.compile(r"^[0-2]$"), timeout=10_000)
    assert engine.in_flight == 1
    page.fill("#prompt", "next question")
    page.press("#prompt", "Enter")  # during a reply: it waits in the box, and the page says so (it said nothing)
    expect(page.locator("#composer-hint")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("next question")
    page.click("#stop")

    reply = page.get_by_test_id("assistant-message").last
    expect(reply).to_have_attribute("data-state", "stopped")
    deadline = time.monotonic() + 5
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.in_flight == 0, "the server kept generating after the stop button"
    # ...and every worker freed the sequence's KV caches: it holds only what prefix caching keeps of finished ones.
    kept = len(engine.prefix_cache)
    deadline, live = time.monotonic() + 5, [None]
    while live != [kept, kept] and time.monotonic() < deadline:  # workers report on their next status ping (1 s)
        time.sleep(0.1)
        live = [w.get("live_sequences") for w in cluster.topology()["workers"]]
    assert live == [kept, kept], f"sequences still held by the workers after stop: {live} ({kept} kept)"
    generated = engine.stats.tokens_generated
    time.sleep(0.5)
    assert engine.stats.tokens_generated == generated
    assert int(page.locator("#chat-tokens").text_content() or "0") < 400
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#chat-state")).to_have_text("stopped")
    expect(page.locator("#composer-hint")).to_be_hidden()


def test_new_chat_during_a_reply_leaves_the_new_conversation_clean(
    page: Page, cluster: Cluster, throttle: Callable[[Engine, float], None]
) -> None:
    """The stopped reply's figures and state were written over the new, empty conversation."""
    throttle(cluster.engine, 0.05)
    page.goto(f"{cluster.url}#chat")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "300")
    send_message(page, PROMPT)
    expect(page.locator("#chat-tokens")).not_to_have_text(re.compile(r"^[0-2]$"), timeout=10_000)
    page.click("#new-chat")
    page.wait_for_timeout(500)  # the aborted reply unwinds meanwhile
    expect(page.locator("#chat-state")).to_have_text("idle")
    expect(page.locator("#chat-tokens")).to_have_text("0")
    expect(page.locator("#chat-tps")).to_have_text("–")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#chat-error")).to_be_hidden()


def test_settings_out_of_range_and_a_conversation_past_the_context_are_explained(
    browser: Browser, cluster: Cluster
) -> None:
    with fresh_page(browser) as (page, problems):
        _settings_and_context(page, cluster)
    assert [p for p in problems if "status of 400" not in p] == []  # the refused prompt, as a failed resource


def _settings_and_context(page: Page, cluster: Cluster) -> None:
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request) if request.method == "POST" else None)
    page.goto(f"{cluster.url}#chat")
    page.fill("#temperature", "5")  # past the field's 0 to 2: it was sent as is
    send_message(page, PROMPT)
    expect(page.locator("#chat-error")).to_contain_text("Temperature")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "2.9")  # it was sent as 2
    send_message(page, PROMPT)
    expect(page.locator("#chat-error")).to_contain_text("Max tokens")
    assert requests == [] and page.locator(".message").count() == 0
    expect(page.locator("#prompt")).to_have_value(PROMPT)  # kept, to send once the setting is fixed

    page.fill("#max-tokens", "4")
    page.fill("#prompt", "")
    send_message(page, "word " * 700)  # past the tiny model's context
    expect(page.locator("#chat-error")).to_contain_text("Shorten this message")


DISTANCE_TO_END = "(l => l.scrollHeight - l.scrollTop - l.clientHeight)(document.getElementById('messages'))"
REPLY_LONGER_THAN = "n => [...document.querySelectorAll('.message.assistant .content')].pop().textContent.length > n"


def test_a_reader_who_scrolls_up_during_a_reply_stays_where_they_are(
    page: Page, cluster: Cluster, throttle: Callable[[Engine, float], None]
) -> None:
    throttle(cluster.engine, 0.05)  # 400 tokens would take 20 s: time to scroll while the reply grows
    page.goto(f"{cluster.url}#chat")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "400")
    # An earlier conversation taller than the list, so that it scrolls.
    page.evaluate(
        """() => {
            const earlier = document.createElement("div");
            earlier.style.minHeight = "3000px";
            document.getElementById("messages").append(earlier);
        }"""
    )
    send_message(page, PROMPT)
    reply = page.get_by_test_id("assistant-message").last.locator(".content")

    def wait_for_more_text() -> None:
        page.wait_for_function(REPLY_LONGER_THAN, arg=len(reply.text_content() or "") + 20)

    expect(reply).not_to_be_empty(timeout=10_000)
    assert page.evaluate(DISTANCE_TO_END) <= 40  # at the end of the conversation, it follows the reply

    page.evaluate("document.getElementById('messages').scrollTop = 100")  # the reader scrolls up to read
    wait_for_more_text()
    assert page.evaluate("document.getElementById('messages').scrollTop") == 100  # no jump back to the bottom

    page.evaluate("(list => { list.scrollTop = list.scrollHeight; })(document.getElementById('messages'))")
    wait_for_more_text()
    assert page.evaluate(DISTANCE_TO_END) <= 40  # back at the end, it follows again
    page.click("#stop")
    expect(page.locator("#chat-state")).to_have_text("stopped")


def test_model_output_is_inserted_as_text_never_as_html(page: Page, cluster: Cluster) -> None:
    """A reply that looks like markup shows as those characters; no element or script comes from it."""
    markup = '<img src="x" onerror="window.__owned = 1"><b>bold</b>'
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": markup[:20]}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": markup[20:]}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 2}},
    ]
    stream = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=stream),
    )
    page.goto(f"{cluster.url}#chat")
    send_message(page, "show me markup")
    reply = page.get_by_test_id("assistant-message").last
    expect(reply).to_have_attribute("data-state", "done")
    assert reply.locator(".content").text_content() == markup
    assert reply.locator(".content *").count() == 0
    assert page.evaluate("window.__owned") is None
    expect(page.locator("#chat-tokens")).to_have_text("2")


def test_api_key_field_is_sent_as_bearer_and_kept(browser: Browser, tiny_llama: Path) -> None:
    with fresh_page(browser) as (page, problems):
        with running_server(tiny_settings(tiny_llama, api_keys=("sesame",))) as server:
            page.goto(f"{server.base_url}/#chat")
            page.fill("#temperature", "0")  # greedy: sampled, the random model may end before its 4 tokens
            page.fill("#max-tokens", "4")
            send_message(page, PROMPT)
            # Without the key the server refuses, and the page says where the key goes.
            expect(page.locator("#chat-error")).to_contain_text("API key")
            expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "error")

            page.fill("#api-key", "sesame")
            send_message(page, PROMPT)
            expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "max tokens")
            expect(page.locator("#chat-error")).to_be_hidden()

            page.reload()
            expect(page.locator("#api-key")).to_have_value("sesame")

            page.fill("#api-key", "ses\u2011ame")  # a pasted non-breaking hyphen: fetch refused it as a TypeError
            send_message(page, PROMPT)
            expect(page.locator("#chat-error")).to_contain_text("API key has a character that cannot be sent")
        # Chromium logs the refused request as a failed resource; anything else is a real problem.
        assert [p for p in problems if "status of 401" not in p] == []
        assert any("status of 401" in p for p in problems)


def test_the_cluster_view_uses_the_saved_api_key(browser: Browser, tiny_llama: Path) -> None:
    # With --api-key (and no --ui-auth) the topology needs the key: the view says where it goes, then uses it.
    with fresh_page(browser) as (page, problems):
        with running_server(tiny_settings(tiny_llama, api_keys=("sesame",))) as server:
            page.goto(f"{server.base_url}/")
            expect(page.locator("#cluster-banner")).to_contain_text("needs the API key")
            page.goto(f"{server.base_url}/#chat")
            page.fill("#api-key", "sesame")
            page.goto(f"{server.base_url}/")
            expect(page.locator("#connection")).to_have_class(re.compile(r"\bok\b"))
            expect(page.locator("#cluster-banner")).to_be_hidden()
            expect(page.get_by_test_id("node-master")).to_be_visible()
        assert [p for p in problems if "status of 401" not in p] == []


def test_a_master_that_stops_answering_is_shown_within_5_seconds(browser: Browser, tiny_llama: Path) -> None:
    with fresh_page(browser) as (page, problems):
        with running_server(tiny_settings(tiny_llama)) as server:
            page.goto(f"{server.base_url}/")
            expect(page.locator("#connection")).to_have_class(re.compile(r"\bok\b"))
            expect(page.locator("#cluster-banner")).to_be_hidden()
        stopped = time.monotonic()
        expect(page.locator("#cluster-banner")).to_contain_text("not answering", timeout=5000)
        assert time.monotonic() - stopped < 5
        expect(page.locator("#connection")).to_have_class(re.compile(r"\blost\b"))
        expect(page.get_by_test_id("node-master")).to_have_class(re.compile(r"\bstale\b"))
        page.evaluate("location.hash = '#chat'")
        send_message(page, PROMPT)  # the chat said "Failed to fetch"
        expect(page.locator("#chat-error")).to_contain_text("The server stopped answering")
        # The refused polls show in the console as failed resources; anything else is a real problem.
        assert [p for p in problems if "ERR_CONNECTION_REFUSED" not in p] == []


def test_an_unload_and_a_model_switch_clear_the_view(
    browser: Browser, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What was drawn belongs to a model that is gone: its layers, tiles and the header's name go, and the view says
    why; the nodes stay listed as they are now (the topology answered 404 and 503 then, and the view went blank)."""
    with fresh_page(browser) as (page, problems):
        with running_server(tiny_settings(tiny_llama, model_name="tiny-llama")) as server:
            page.goto(f"{server.base_url}/")
            expect(page.locator("#model-name")).to_have_text("tiny-llama")
            expect(page.get_by_test_id("node-master")).to_contain_text("layers 0–2 (3)")
            expect(page.locator("#sum-layers")).to_have_text("3")

            assert httpx.post(f"{server.base_url}/models/unload", timeout=30).status_code == 200
            expect(page.locator("#model-name")).to_have_text("No model loaded")
            expect(page.get_by_test_id("node-master")).to_contain_text("no transformer layers")
            expect(page.get_by_test_id("node-master")).to_have_attribute("data-status", "up")
            expect(page.get_by_test_id("no-model")).to_contain_text("No model loaded")
            expect(page.locator("#sum-model")).to_have_text("No model loaded")
            for tile in ("#sum-layers", "#sum-weights", "#sum-total"):
                expect(page.locator(tile)).to_have_text("–")
            expect(page.locator("#cluster-banner")).to_be_hidden()  # the master answers: nothing is broken
            expect(page.locator("#connection")).to_have_class(re.compile(r"\bok\b"))

            # A load that takes a while: the view says so until the new model is served.
            building = threading.Event()
            go_on = threading.Event()
            build = management.build_engine

            def slow_build(*args: Any) -> Engine:
                building.set()
                go_on.wait(30)
                return build(*args)

            monkeypatch.setattr(management, "build_engine", slow_build)
            with ThreadPoolExecutor(1) as pool:
                load = pool.submit(
                    httpx.post, f"{server.base_url}/models/load", json={"model_id": str(tiny_llama)}, timeout=60
                )
                assert building.wait(30)
                expect(page.locator("#model-name")).to_have_text("Loading…")
                expect(page.locator("#sum-model")).to_have_text("Loading…")
                expect(page.get_by_test_id("no-model")).to_contain_text("loading model")
                go_on.set()
                assert load.result().status_code == 200

            name = server.state.model_name
            expect(page.locator("#model-name")).to_have_text(name)
            expect(page.get_by_test_id("node-master")).to_contain_text("layers 0–2 (3)")
            expect(page.locator("#sum-layers")).to_have_text("3")
            expect(page.get_by_test_id("no-model")).to_have_count(0)
            _screenshot(page, "cluster-after-switch.png")

            # The same model loaded again says the same words as the first load: the cards still go meanwhile.
            building.clear()
            go_on.clear()
            with ThreadPoolExecutor(1) as pool:
                load = pool.submit(
                    httpx.post, f"{server.base_url}/models/load", json={"model_id": str(tiny_llama)}, timeout=60
                )
                assert building.wait(30)
                expect(page.get_by_test_id("no-model")).to_contain_text("loading model")
                expect(page.get_by_test_id("node-master")).to_contain_text("no transformer layers")
                expect(page.locator("#sum-layers")).to_have_text("–")
                go_on.set()
                assert load.result().status_code == 200
            expect(page.get_by_test_id("node-master")).to_contain_text("layers 0–2 (3)")
        # Chromium logs the 404 and 503 answers as failed resources; anything else is a real problem.
        assert [p for p in problems if not re.search(r"status of (404|503)", p)] == []


def test_a_failed_send_gives_its_text_back_and_a_cut_stream_is_not_done(browser: Browser, cluster: Cluster) -> None:
    """A send that got no answer is marked unsent (it is not in the next request's context) and its text comes back
    to the message box; a proxy's plain-text error is shown; a stream that closes mid-reply says it was cut off."""
    with fresh_page(browser) as (page, problems):
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(status=503, headers={"Content-Type": "text/plain"}, body="engine overloaded"),
        )
        page.goto(f"{cluster.url}#chat")
        send_message(page, "first question")
        expect(page.locator("#chat-error")).to_contain_text("HTTP 503")
        expect(page.locator("#chat-error")).to_contain_text("engine overloaded")
        expect(page.get_by_test_id("user-message").last).to_have_attribute("data-state", "unsent")
        expect(page.locator("#prompt")).to_have_value("first question")
        page.unroute("**/v1/chat/completions")
        page.route(  # an error field that is null: the status alone, not "HTTP 400: null"
            "**/v1/chat/completions",
            lambda route: route.fulfill(
                status=400, headers={"Content-Type": "application/json"}, body='{"detail": null}'
            ),
        )
        send_message(page, "first question")
        expect(page.locator("#chat-error")).to_have_text(re.compile(r"^HTTP 400( Bad Request)?$"))

        cut = 'data: {"choices": [{"index": 0, "delta": {"content": "Hello wor"}, "finish_reason": null}]}\n\n'
        page.unroute("**/v1/chat/completions")
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=cut),
        )
        send_message(page, "second question")
        reply = page.get_by_test_id("assistant-message").last
        expect(reply).to_have_attribute("data-state", "error")
        expect(reply.locator(".content")).to_have_text("Hello wor")
        expect(page.locator("#chat-error")).to_contain_text("cut off")
        expect(page.locator("#chat-tps")).to_have_text("–")  # one token: no rate to speak of
    assert [p for p in problems if "status of 503" not in p and "status of 400" not in p] == []


def test_the_views_work_with_site_data_blocked(browser: Browser, cluster: Cluster) -> None:
    """A browser that blocks site data throws on every localStorage read: the chat could not send, the cluster view
    never drew. Now only the settings are forgotten on reload."""
    with fresh_page(browser) as (page, problems):
        page.add_init_script(
            "Object.defineProperty(window, 'localStorage', "
            "{ get() { throw new DOMException('The operation is insecure.', 'SecurityError'); } });"
        )
        page.goto(cluster.url)
        expect(page.get_by_test_id("node-worker-1")).to_have_attribute("data-status", "up")
        expect(page.locator("#cluster-banner")).to_be_hidden()
        page.goto(f"{cluster.url}#chat")
        page.fill("#temperature", "0")  # greedy: sampled, the random model may end before its 4 tokens
        page.fill("#max-tokens", "4")
        send_message(page, PROMPT)
        expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", "max tokens")
    assert problems == []


def test_focus_stays_where_the_reader_types_and_a_bad_number_is_refused(
    page: Page, cluster: Cluster, held: Callable[[Engine, float], threading.Event]
) -> None:
    """A reply that ends moved the keyboard into the message box, mid-word in the system prompt; a temperature the
    field cannot read ("1e") was dropped from the request without a word."""
    go_on = held(cluster.engine, 0.05)
    page.goto(f"{cluster.url}#chat")
    page.fill("#temperature", "0")  # greedy: at the page's 0.7 the random model sometimes ended early ("done")
    page.fill("#max-tokens", "12")
    send_message(page, PROMPT)
    reply = page.get_by_test_id("assistant-message").last
    expect(reply).to_have_attribute("data-state", "streaming")
    page.click("#system-prompt")
    page.keyboard.type("You are a pirate ")
    go_on.set()  # the reply comes, and ends, while the reader types in the system prompt
    expect(reply).to_have_attribute("data-state", "max tokens", timeout=20_000)
    page.keyboard.type("who rhymes.")
    expect(page.locator("#system-prompt")).to_have_value("You are a pirate who rhymes.")
    expect(page.locator("#prompt")).to_have_value("")

    page.fill("#system-prompt", "")
    page.click("#temperature")
    page.keyboard.press("Control+A")
    page.keyboard.type("1e")
    send_message(page, PROMPT)
    expect(page.locator("#chat-error")).to_be_visible()
    expect(page.get_by_test_id("assistant-message")).to_have_count(1)  # nothing was sent


def test_node_cards_keep_their_text_between_polls(page: Page, cluster: Cluster) -> None:
    """Facts and figures were rebuilt every second, so an address or an error selected to copy went away."""
    page.goto(cluster.url)
    card = page.get_by_test_id("node-worker-1")
    expect(card).to_have_attribute("data-status", "up")
    kept = page.evaluate_handle("document.querySelector('[data-testid=\"node-worker-1\"] .facts dd')")
    page.wait_for_timeout(2500)  # two polls or more
    assert page.evaluate("dd => dd.isConnected", kept)


def test_the_view_tabs_follow_the_arrow_keys(page: Page, cluster: Cluster) -> None:
    """The views' links are a tablist, but only Tab and Enter reached them: the arrow keys, Home and End did nothing
    (the WAI-ARIA tabs pattern), and the unselected tab was a tab stop of its own."""
    page.goto(cluster.url)
    tabs = {name: page.get_by_role("tab", name=name) for name in ("Cluster", "Chat")}

    def selected(name: str) -> None:
        other = "Chat" if name == "Cluster" else "Cluster"
        expect(tabs[name]).to_be_focused()
        expect(tabs[name]).to_have_attribute("aria-selected", "true")
        expect(tabs[name]).to_have_attribute("tabindex", "0")  # the tablist's one tab stop
        expect(tabs[other]).to_have_attribute("aria-selected", "false")
        expect(tabs[other]).to_have_attribute("tabindex", "-1")
        expect(page.get_by_role("tabpanel")).to_have_attribute("aria-labelledby", f"tab-{name.lower()}")

    tabs["Cluster"].focus()
    page.keyboard.press("ArrowRight")
    selected("Chat")  # the keyboard stays on the tab, not in the message box
    expect(page).to_have_url(re.compile("#chat$"))
    page.keyboard.press("ArrowRight")  # past the last: the first
    selected("Cluster")
    page.keyboard.press("ArrowLeft")  # before the first: the last
    selected("Chat")
    page.keyboard.press("Home")
    selected("Cluster")
    page.keyboard.press("End")
    selected("Chat")
    page.keyboard.press("ArrowLeft")
    selected("Cluster")
    page.keyboard.press("Tab")  # out of the tablist, into the view: not onto the other tab
    expect(tabs["Chat"]).not_to_be_focused()
    expect(tabs["Cluster"]).not_to_be_focused()

    tabs["Chat"].click()  # a click still puts the keyboard in the message box
    expect(page.locator("#prompt")).to_be_focused()
    expect(tabs["Chat"]).to_have_attribute("tabindex", "0")


# ---- small screens -----------------------------------------------------------------------------------------------


def test_phone_sized_screen_has_no_horizontal_scroll(browser: Browser, cluster: Cluster) -> None:
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(cluster.url)
        expect(page.get_by_test_id("node-worker-2")).to_have_attribute("data-status", "up")
        page.get_by_test_id("node-worker-1").locator(".chip", has_text="0").click()
        expect(page.locator(".tensor-block")).to_have_count(1)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        _screenshot(page, "phone-cluster.png")

        def long_names(route: Route) -> None:  # a host name or an address: it widened every card past the screen
            answer = route.fetch()
            document = answer.json()
            document["workers"][0]["name"] = "gpu-box-1.example.internal:10128"
            route.fulfill(response=answer, body=json.dumps(document))

        page.route("**/api/v1/topology", long_names)
        page.reload()
        expect(page.locator(".node", has_text="gpu-box-1.example")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.unroute("**/api/v1/topology")

        page.goto(f"{cluster.url}#chat")
        expect(page.locator("#settings")).not_to_have_attribute("open", "")  # collapsed on a phone
        page.click("#settings summary")
        page.fill("#max-tokens", "24")
        send_message(page, PROMPT)
        expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-state", re.compile("done|max"))
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        _screenshot(page, "phone-chat.png")
    finally:
        context.close()


# ---- faults (last: it kills a worker of the module's cluster) ----------------------------------------------------


def test_killed_worker_turns_its_card_down_within_5_seconds(page: Page, cluster: Cluster) -> None:
    page.goto(cluster.url)
    card = page.get_by_test_id("node-worker-2")
    expect(card).to_have_attribute("data-status", "up")

    cluster.workers["worker-2"].kill()
    killed = time.monotonic()
    expect(card).to_have_attribute("data-status", "down", timeout=5000)
    assert time.monotonic() - killed < 5
    expect(card).to_have_class(re.compile(r"\bdown\b"))
    expect(card.locator(".status")).to_have_text("down")
    expect(card.locator(".node-error")).not_to_be_empty()
    # What its last ping said of its memory and caches no longer holds: shown as unknown, not as stale figures.
    expect(card.locator(".mem-label")).to_have_text("memory unknown")
    expect(card.locator(".metric", has_text="kv cache")).to_have_count(0)
    expect(card.locator(".metric", has_text="sequences")).to_have_count(0)
    expect(page.locator('.hop[data-to="worker-2"]')).to_have_class(re.compile(r"\bdown\b"))
    expect(page.get_by_test_id("node-worker-1")).to_have_attribute("data-status", "up")
    _screenshot(page, "cluster-worker-down.png")
