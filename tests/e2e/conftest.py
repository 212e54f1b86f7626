"""The browser the dashboard's tests share (one Chromium per test module) and the page fixture that fails a test
whose page reported a script or console error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS, fresh_page


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Debian's Chromium is missing at {CHROMIUM}: the browser tests need it and never skip. "
            "Install it with `scripts/setup.sh --browser` (or `apt-get install -y chromium`)."
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page that must raise no script error and log no console error."""
    with fresh_page(browser) as (page, problems):
        yield page
    assert problems == [], f"the page reported errors: {problems}"
