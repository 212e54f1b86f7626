"""The dashboard's cluster view off the happy path, in headless Chromium: a master that answers slowly or not at all,
and workers whose long names differ only at their end."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Route, expect

from cake_py.api import topology
from tests.fixtures.browser import fresh_page
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
