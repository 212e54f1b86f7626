"""vLLM's /v1/score and the rerank routes against a real uvicorn server on the tiny Llama: scores are the cosine
similarity of transformers' own embeddings of the texts, reranking orders by them, and every bad field is named."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.fixtures.server import ServerHandle, running_server, tiny_settings

transformers = pytest.importorskip("transformers")

QUERY = "Where is Paris?"
DOCUMENTS = ["The capital of France is Paris.", "Cake is sweet.", "A cluster splits a model's layers.", "Paris"]


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama, model_name="tiny-llama")) as handle:
        yield handle


@pytest.fixture(scope="module")
def similarity(tiny_llama: Path) -> Any:
    """The reference: transformers' last hidden state of each text's last token, compared by cosine."""
    model = transformers.AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            return model(tokenizer(text, return_tensors="pt").input_ids).last_hidden_state[0, -1]

    def cosine(a: str, b: str) -> float:
        return float(torch.nn.functional.cosine_similarity(embed(a), embed(b), dim=0))

    return cosine


def post(server: ServerHandle, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


@pytest.mark.parametrize("path", ["/v1/score", "/score"])
def test_a_score_is_the_cosine_of_the_two_embeddings(server: ServerHandle, similarity: Any, path: str) -> None:
    one_to_many = post(server, path, {"model": "tiny-llama", "text_1": QUERY, "text_2": DOCUMENTS})
    assert one_to_many.status_code == 200, one_to_many.text
    body = one_to_many.json()
    assert body["object"] == "list" and body["model"] == "tiny-llama" and body["usage"]["total_tokens"] > 0
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3]
    for item, document in zip(body["data"], DOCUMENTS, strict=True):
        assert item["object"] == "score" and item["score"] == pytest.approx(similarity(QUERY, document), abs=1e-4)
    pairwise = post(server, path, {"text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[2:]}).json()["data"]
    assert [item["score"] for item in pairwise] == pytest.approx(
        [similarity(DOCUMENTS[0], DOCUMENTS[2]), similarity(DOCUMENTS[1], DOCUMENTS[3])], abs=1e-4
    )
    same = post(server, path, {"text_1": "Cake is sweet.", "text_2": "Cake is sweet."}).json()
    assert same["data"][0]["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/reranking", "/v1/reranking"])
def test_rerank_orders_the_documents_by_their_score(server: ServerHandle, similarity: Any, path: str) -> None:
    expected = sorted(range(len(DOCUMENTS)), key=lambda index: -similarity(QUERY, DOCUMENTS[index]))
    answer = post(server, path, {"query": QUERY, "documents": DOCUMENTS})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [result["index"] for result in results] == expected
    assert [result["document"]["text"] for result in results] == [DOCUMENTS[index] for index in expected]
    scores = [result["relevance_score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    top = post(server, path, {"query": QUERY, "documents": [{"text": d} for d in DOCUMENTS], "top_n": 2}).json()
    assert [result["index"] for result in top["results"]] == expected[:2]
    bare = post(server, path, {"query": QUERY, "documents": DOCUMENTS, "return_documents": False}).json()
    assert all("document" not in result for result in bare["results"])


def test_a_text_given_twice_is_embedded_once(server: ServerHandle) -> None:
    once = post(server, "/v1/score", {"text_1": QUERY, "text_2": [DOCUMENTS[1]]}).json()["usage"]["prompt_tokens"]
    twice = post(server, "/v1/score", {"text_1": QUERY, "text_2": [DOCUMENTS[1]] * 3}).json()
    assert twice["usage"]["prompt_tokens"] == once and len(twice["data"]) == 3


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/score", {"text_2": "a"}, "text_1 must be"),
        ("/v1/score", {"text_1": "a", "text_2": []}, "text_2 must be"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1 holds 2 texts and text_2 3"),
        ("/v1/score", {"text_1": "a", "text_2": ["b", ""]}, "text_2[1]"),
        ("/v1/rerank", {"documents": ["a"]}, "query must be"),
        ("/v1/rerank", {"query": "q", "documents": [{"title": "a"}]}, "documents[0]"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ("/v1/rerank", {"query": "q", "documents": ["a"] * 2049}, "documents holds 2049 texts; at most 2048"),
        ("/v1/score", {"text_1": "a", "text_2": ["b"] * 2049}, "text_2 holds 2049 texts"),
    ],
)
def test_bad_requests_are_named(server: ServerHandle, path: str, body: dict[str, Any], needle: str) -> None:
    answer = post(server, path, body)
    assert answer.status_code == 400, answer.text
    assert needle in answer.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/v1/rerank", {"query": "q " * 5000, "documents": ["a"]}, "query: "),
        ("/v1/rerank", {"query": "q", "documents": ["a", "cake " * 5000]}, "documents[1]: "),
        ("/v1/score", {"text_1": "a", "text_2": ["b", "c", "cake " * 5000]}, "text_2[2]: "),
    ],
)
def test_a_text_too_long_is_named(server: ServerHandle, path: str, body: dict[str, Any], where: str) -> None:
    answer = post(server, path, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(where) and answer.json()["code"] == "context_length_exceeded"


def test_langchains_null_top_n_is_every_document(server: ServerHandle) -> None:
    answer = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": None})
    assert answer.status_code == 200 and len(answer.json()["results"]) == len(DOCUMENTS)


def test_each_field_may_hold_the_limit_and_scores_stay_within_one(
    server: ServerHandle, similarity: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents within their limit were refused as "input holds 2049 items" (the query and documents went to the
    embeddings route in one request, over its limit); a text against itself could read 1.0000000000000004."""
    from cake_py.api import embeddings, scores

    monkeypatch.setattr(embeddings, "MAX_INPUTS", 3)
    monkeypatch.setattr(scores, "MAX_INPUTS", 3)
    answer = post(server, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS[:3]})  # 4 texts to embed
    assert answer.status_code == 200, answer.text
    ranked = {result["index"]: result["relevance_score"] for result in answer.json()["results"]}
    for index in range(3):
        assert ranked[index] == pytest.approx(similarity(QUERY, DOCUMENTS[index]), abs=1e-5)
    itself = post(server, "/v1/rerank", {"query": QUERY, "documents": [QUERY]}).json()["results"][0]
    assert itself["relevance_score"] == pytest.approx(1.0) and itself["relevance_score"] <= 1.0
    too_many = post(server, "/v1/rerank", {"query": QUERY, "documents": [*DOCUMENTS[:3], "more"]})
    assert too_many.status_code == 400 and "documents holds 4 texts; at most 3" in too_many.json()["error"]
