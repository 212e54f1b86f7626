"""The dashboard's cluster view off the happy path, in headless Chromium: a master that answers slowly or not at all
(asked less and less often while it is down, never from a hidden tab), and workers whose long names differ only at
their end."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Route, expect

from cake_py.api import topology
from tests.fixtures.browser import fresh_page, set_hidden
from tests.fixtures.server import running_server, tiny_settings


def test_a_slow_master_is_drawn_once_it_answers_and_never_asked_twice_at_once(
    browser: Browser, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A topology that took more than 2.5 s was dropped at 2.5 s and asked again: the view never drew the master
    and said it was not answering, though it answered every time."""
    document = topology.topology_document
    lock = threading.Lock()
    running, most = 0, 0

    def slow(state: Any) -> dict[str, Any]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(3.5)
            return document(state)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(topology, "topology_document", slow)
    with running_server(tiny_settings(tiny_llama, model_name="tiny-llama")) as server:
        with fresh_page(browser) as (page, problems):
            page.goto(f"{server.base_url}/")
            expect(page.locator("#cluster-banner")).to_contain_text("not answering", timeout=5000)
            expect(page.get_by_test_id("node-master")).to_contain_text("layers 0–2 (3)", timeout=10_000)
            expect(page.locator("#model-name")).to_have_text("tiny-llama")
            page.wait_for_timeout(5000)  # another slow answer or more
        assert problems == []
    assert most == 1, f"{most} topology requests ran at once"


def test_a_master_that_stops_answering_is_announced_once(browser: Browser, tiny_llama: Path) -> None:
    """The banner was no live region, so a screen reader never said the master was lost; and its text was re-set at
    every poll, which a live region says again every second."""
    with running_server(tiny_settings(tiny_llama)) as server:
        with fresh_page(browser) as (page, problems):
            page.goto(f"{server.base_url}/")
            expect(page.get_by_test_id("node-master")).to_be_visible()
            page.route("**/api/v1/topology", lambda route: route.abort("connectionrefused"))
            expect(page.get_by_role("status")).to_contain_text("not answering")
            said = page.evaluate_handle("document.getElementById('cluster-banner').firstChild")
            page.wait_for_timeout(2500)  # two failed polls or more
            assert page.evaluate("text => text.isConnected", said), "the banner's text was replaced"
            page.unroute("**/api/v1/topology")
            expect(page.get_by_role("status")).to_have_count(0)  # back: the banner goes
        assert [p for p in problems if "ERR_CONNECTION_REFUSED" not in p] == []


TOPOLOGY = "**/api/v1/topology"


def _wait_for_asks(page: Page, asked: list[float], count: int, within_s: float) -> float:
    """Seconds until `asked` holds `count` requests; fails past `within_s`."""
    start = time.monotonic()
    while len(asked) < count:
        assert time.monotonic() - start < within_s, f"{len(asked)} topology requests, not {count}, in {within_s} s"
        page.wait_for_timeout(20)
    return time.monotonic() - start


def test_a_master_that_stays_down_is_asked_less_and_less_often(browser: Browser, tiny_llama: Path) -> None:
    """The view asked a master that was down once a second for as long as the tab stayed open, each failure an error
    in the console, and said only "Retrying every second": now 1 s, 2 s, 4 s… apart (at most 15 s), with a
    countdown, a Retry now button, and every second again once it answers."""
    with running_server(tiny_settings(tiny_llama)) as server:
        with fresh_page(browser) as (page, problems):
            page.goto(f"{server.base_url}/")
            expect(page.get_by_test_id("node-master")).to_be_visible()
            asked: list[float] = []

            def refuse(route: Route) -> None:
                asked.append(time.monotonic())
                route.abort("connectionrefused")

            page.route(TOPOLOGY, refuse)
            banner = page.get_by_role("status")
            expect(banner).to_contain_text("not answering")
            # Failures at +0, +1 and +3 s: the next try is 4 s off.
            expect(banner).to_contain_text("Retrying in 4 s", timeout=6000)
            assert len(asked) == 3, asked
            gaps = [round(b - a, 2) for a, b in zip(asked, asked[1:], strict=False)]
            assert gaps[0] >= 0.8 and gaps[1] >= 1.8, f"asked again sooner than 1 s, then 2 s: {gaps}"
            # Timed from the third failure, not from when the banner was read: a loaded machine reads it late.
            page.wait_for_timeout(max(0.0, asked[2] + 2.0 - time.monotonic()) * 1000)
            assert len(asked) == 3, "asked again before the 4 s were up"  # every second, this was 4 or 5
            expect(banner).to_contain_text(re.compile(r"Retrying in [123] s"))  # the countdown moves

            page.get_by_role("button", name="Retry now").click()
            _wait_for_asks(page, asked, 4, within_s=10)
            assert asked[3] - asked[2] < 3.6, "Retry now waited for the pause to end"  # which ends at 4 s
            expect(banner).to_contain_text("Retrying in 8 s")

            page.unroute(TOPOLOGY)
            page.route(TOPOLOGY, lambda route: (asked.append(time.monotonic()), route.continue_()))
            page.get_by_role("button", name="Retry now").click()
            expect(page.get_by_role("status")).to_have_count(0)  # back: the banner goes
            expect(page.locator("#connection")).to_have_class(re.compile(r"\bok\b"))
            # Answered: asked every second again, not 16 s later.
            _wait_for_asks(page, asked, 7, within_s=3)
            page.unroute(TOPOLOGY)
            page.goto("about:blank")
        assert [p for p in problems if "ERR_CONNECTION_REFUSED" not in p] == []


def test_a_hidden_tab_asks_nothing_and_asks_at_once_when_shown_again(browser: Browser, tiny_llama: Path) -> None:
    """A tab in the background polled the topology every second like a visible one; shown again, it waited for its
    next poll. Now a hidden tab asks nothing, and one shown again asks at once, also while the master is down."""
    with running_server(tiny_settings(tiny_llama)) as server:
        with fresh_page(browser) as (page, problems):
            asked: list[float] = []
            failing = False

            def answer(route: Route) -> None:
                asked.append(time.monotonic())
                if failing:
                    route.abort("connectionrefused")
                else:
                    route.continue_()

            page.route(TOPOLOGY, answer)
            page.goto(f"{server.base_url}/")
            expect(page.get_by_test_id("node-master")).to_be_visible()

            set_hidden(page, True)
            page.wait_for_timeout(300)  # a poll already under way ends
            before = len(asked)
            page.wait_for_timeout(3000)
            assert len(asked) == before, f"a hidden tab asked {len(asked) - before} times in 3 s"
            set_hidden(page, False)
            _wait_for_asks(page, asked, before + 1, within_s=3)  # polling again

            # The master goes: shown again, the tab asks at once rather than at the end of its pause.
            failing = True
            expect(page.get_by_role("status")).to_contain_text("Retrying in 4 s", timeout=8000)
            set_hidden(page, True)
            before = len(asked)
            page.wait_for_timeout(5000)  # past the 4 s retry
            assert len(asked) == before, "a hidden tab retried"
            set_hidden(page, False)
            # At once: the retry it skipped while hidden is not put off to the end of the next pause (8 s).
            _wait_for_asks(page, asked, before + 1, within_s=3)
            expect(page.get_by_role("status")).to_contain_text("Retrying in 8 s")
            page.unroute(TOPOLOGY)
            page.goto("about:blank")
        assert [p for p in problems if "ERR_CONNECTION_REFUSED" not in p] == []


def test_workers_whose_names_differ_at_the_end_are_told_apart(page: Page, tiny_llama: Path) -> None:
    """A card's name was cut with an ellipsis after a dozen characters: two workers named by their hosts
    (ip-10-0-0-5.eu-west-1.compute.internal, ip-10-0-0-6.…) read the same, so which one was down could not be told."""
    names = [f"ip-10-0-0-{n}.eu-west-1.compute.internal" for n in (5, 6)]

    def two_workers(route: Route) -> None:
        answer = route.fetch()
        document = answer.json()
        master = document["master"]
        document["workers"] = [{**master, "name": name, "host": name, "layers": []} for name in names]
        document["workers"][1].update(status="down", error="not answering")
        route.fulfill(response=answer, body=json.dumps(document))

    with running_server(tiny_settings(tiny_llama)) as server:
        page.route("**/api/v1/topology", two_workers)
        page.goto(f"{server.base_url}/")
        for name in names:
            title = page.get_by_test_id(f"node-{name}").locator("h3")
            expect(title).to_have_text(name)
            assert title.evaluate("h3 => h3.scrollWidth <= h3.clientWidth"), f"{name} is cut short"
        page.unroute("**/api/v1/topology")
        page.goto("about:blank")  # no poll is left in flight when the server stops


OPACITY = "n => { let o = 1; for (; n; n = n.parentElement) o *= Number(getComputedStyle(n).opacity); return o; }"
# The summary dimmed as the master's card is (both fade in 0.2 s: read once, either may be halfway).
DIMMED_AS_THE_CARDS = f"""() => {{
    const opacity = {OPACITY};
    const card = opacity(document.querySelector('[data-testid="node-master"]'));
    return card < 1 && opacity(document.getElementById("sum-nodes")) === card;
}}"""
NOT_DIMMED = f"() => ({OPACITY})(document.getElementById('sum-nodes')) === 1"


def test_the_summary_is_dimmed_and_its_live_figures_cleared_while_the_master_is_lost(
    browser: Browser, tiny_llama: Path
) -> None:
    """With the master lost, the header's figures read "–" and the cards dimmed, but the summary's tiles kept their
    last tokens/s, requests in flight and "on 3 nodes · 3 up" as if live."""
    with running_server(tiny_settings(tiny_llama)) as server:
        with fresh_page(browser) as (page, problems):
            page.goto(f"{server.base_url}/")
            expect(page.get_by_test_id("node-master")).to_be_visible()
            expect(page.locator("#sum-tps")).to_have_text("0.0")
            page.wait_for_function(NOT_DIMMED)

            page.route(TOPOLOGY, lambda route: route.abort("connectionrefused"))
            expect(page.get_by_role("status")).to_contain_text("not answering")
            expect(page.locator("#live-tps")).to_have_text("–")
            for tile in ("#sum-tps", "#sum-in-flight"):
                expect(page.locator(tile)).to_have_text("–")
            page.wait_for_function(DIMMED_AS_THE_CARDS, timeout=5000)

            page.unroute(TOPOLOGY)
            expect(page.get_by_role("status")).to_have_count(0)  # back: the figures are live again
            expect(page.locator("#sum-tps")).to_have_text("0.0")
            expect(page.locator("#sum-in-flight")).to_have_text("0")
            page.wait_for_function(NOT_DIMMED, timeout=5000)
            page.goto("about:blank")
        assert [p for p in problems if "ERR_CONNECTION_REFUSED" not in p] == []


def test_the_hop_to_a_worker_that_is_down_shows_no_round_trip(page: Page, tiny_llama: Path) -> None:
    """The arrow to a worker that was down kept its last figures ("10.5 ms round trip · 0.5 ms wire") as if it were
    still answering, while its card said "memory unknown"."""

    def two_workers(route: Route) -> None:
        answer = route.fetch()
        document = answer.json()
        master = document["master"]
        document["workers"] = [
            {**master, "name": name, "host": name, "layers": [], "round_trip_ms": 10.5, "hop_ms": 0.5}
            for name in ("worker-1", "worker-2")
        ]
        document["workers"][1].update(status="down", error="not answering")
        route.fulfill(response=answer, body=json.dumps(document))

    with running_server(tiny_settings(tiny_llama)) as server:
        page.route(TOPOLOGY, two_workers)
        page.goto(f"{server.base_url}/")
        up, down = (page.locator(f'.hop[data-to="{name}"]') for name in ("worker-1", "worker-2"))
        expect(up.locator("b")).to_have_text("10.5 ms")  # round trip
        expect(up.locator(".hop-label.muted")).to_have_text("0.5 ms wire")
        expect(down).to_have_class(re.compile(r"\bdown\b"))
        expect(down.locator("b")).to_have_text("–")
        expect(down.locator(".hop-label.muted")).to_have_text("– wire")
        page.unroute(TOPOLOGY)
        page.goto("about:blank")  # no poll is left in flight when the server stops
