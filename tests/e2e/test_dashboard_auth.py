"""The dashboard's cluster view against masters that guard the topology, in headless Chromium: with --api-key it
sends the key saved in the chat's settings from the first poll; with --ui-auth it leaves the browser's Basic login
alone; with no key at all a saved one does no harm."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Response, expect

from tests.fixtures.browser import DESKTOP, collect_problems
from tests.fixtures.server import ServerHandle, running_server, tiny_settings

TOPOLOGY = "/api/v1/topology"


def _topology_statuses(page: Page) -> list[int]:
    """The status of every topology answer `page` gets from now on."""
    statuses: list[int] = []

    def seen(response: Response) -> None:
        if response.url.endswith(TOPOLOGY):
            statuses.append(response.status)

    page.on("response", seen)
    return statuses


def _load_with_the_key_saved(page: Page, server: ServerHandle, key: str) -> tuple[list[int], list[str]]:
    """Save `key` in the chat's settings, load the page afresh, and give back the topology answers of that load and
    the script and console errors it reported, once the cluster view has drawn the master and polled a few times."""
    page.goto(f"{server.base_url}/#chat")
    page.fill("#api-key", key)
    page.goto("about:blank")
    statuses = _topology_statuses(page)
    problems = collect_problems(page)
    page.goto(f"{server.base_url}/")
    expect(page.get_by_test_id("node-master")).to_be_visible()
    expect(page.locator("#cluster-banner")).to_be_hidden()
    page.wait_for_timeout(2500)  # two polls or more
    page.goto("about:blank")  # no poll is left in flight when the server stops
    return statuses, problems


@pytest.mark.parametrize("keys", [("sesame",), ()], ids=["keyed master", "open master"])
def test_a_saved_key_goes_with_the_first_poll(browser: Browser, tiny_llama: Path, keys: tuple[str, ...]) -> None:
    """The view sent the saved key only once a poll had been refused for want of it: with --api-key every page load
    logged `GET /api/v1/topology 401` in the console, though the key was saved. A master without keys takes it
    unharmed."""
    with running_server(tiny_settings(tiny_llama, api_keys=keys)) as server:
        context = browser.new_context(viewport=DESKTOP)
        try:
            statuses, problems = _load_with_the_key_saved(context.new_page(), server, "sesame")
        finally:
            context.close()
    assert statuses and set(statuses) == {200}, statuses
    assert problems == []


def test_the_browsers_login_is_kept_behind_ui_auth(browser: Browser, tiny_llama: Path) -> None:
    """With --ui-auth the topology takes the browser's Basic login, which the key's Authorization header replaces:
    the view stops sending the key at the Basic challenge, and later loads do not try it first."""
    settings = tiny_settings(tiny_llama, api_keys=("sesame",), ui_auth=("ada", "lovelace"))
    with running_server(settings) as server:
        context = browser.new_context(viewport=DESKTOP, http_credentials={"username": "ada", "password": "lovelace"})
        try:
            page = context.new_page()
            statuses, _ = _load_with_the_key_saved(page, server, "sesame")
            assert statuses[-1] == 200 and statuses.count(401) <= 1, statuses
            again = _topology_statuses(page)
            page.goto(f"{server.base_url}/")
            expect(page.get_by_test_id("node-master")).to_be_visible()
            page.wait_for_timeout(1500)
            page.goto("about:blank")
        finally:
            context.close()
    assert again and set(again) == {200}, again
