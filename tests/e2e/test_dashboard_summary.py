"""The cluster view's summary tiles in headless Chromium: what their lines say and that what matters in them is not
cut off."""

from __future__ import annotations

import json
from pathlib import Path

from playwright.sync_api import Page, Route, expect

from tests.fixtures.server import running_server, tiny_settings

TOPOLOGY = "**/api/v1/topology"

# Whether the characters `word` of an element's text lie inside its box (not cut off by its ellipsis).
SHOWN = """(node, word) => {
    const text = node.firstChild;
    const at = text.data.indexOf(word);
    const range = document.createRange();
    range.setStart(text, at);
    range.setEnd(text, at + word.length);
    return at >= 0 && range.getBoundingClientRect().right <= node.getBoundingClientRect().right;
}"""


def test_the_model_tile_shows_the_dtype_and_holds_the_whole_line_in_its_title(page: Page, tiny_llama: Path) -> None:
    """The Model tile's line read "HuggingFaceTB/SmolLM2-135M-Instruct · bfloat16" in a tile too narrow for it, cut
    with an ellipsis and with no title: the dtype was never seen."""
    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"

    def served_as_smollm(route: Route) -> None:
        answer = route.fetch()
        route.fulfill(response=answer, body=json.dumps({**answer.json(), "model_id": model_id, "dtype": "bfloat16"}))

    with running_server(tiny_settings(tiny_llama)) as server:
        page.route(TOPOLOGY, served_as_smollm)
        page.goto(f"{server.base_url}/")
        line = page.locator("#sum-dtype")
        expect(line).to_contain_text(model_id)
        assert line.evaluate(SHOWN, "bfloat16"), f"the dtype is cut off: {line.text_content()!r}"
        full = line.text_content() or ""
        assert "bfloat16" in full and model_id in full
        expect(line).to_have_attribute("title", full)
        page.unroute(TOPOLOGY)
        page.goto("about:blank")  # no poll is left in flight when the server stops


def test_the_layers_tile_counts_one_node_in_the_singular(page: Page, tiny_llama: Path) -> None:
    """A master alone read "on 1 nodes · 1 up"."""

    def with_a_worker(route: Route) -> None:
        answer = route.fetch()
        document = answer.json()
        document["workers"] = [{**document["master"], "name": "worker-1", "host": "worker-1", "layers": []}]
        route.fulfill(response=answer, body=json.dumps(document))

    with running_server(tiny_settings(tiny_llama)) as server:
        page.goto(f"{server.base_url}/")
        expect(page.locator("#sum-nodes")).to_have_text("on 1 node · 1 up")
        page.route(TOPOLOGY, with_a_worker)
        expect(page.locator("#sum-nodes")).to_have_text("on 2 nodes · 2 up")
        page.unroute(TOPOLOGY)
        page.goto("about:blank")  # no poll is left in flight when the server stops
