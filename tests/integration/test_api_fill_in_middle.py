"""OpenAI's `suffix` on /v1/completions (fill in the middle) through the official client against a real uvicorn
server on the tiny Llama given fill-in-the-middle tokens: the prompt is prefix-suffix-middle, the answer what goes
between."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from cake_py.models.fill_in_middle import fim_prompt, fim_tokens
from cake_py.models.tokenizer import Tokenizer
from tests.fixtures.server import ServerHandle, running_server, tiny_settings

PREFIX, SUFFIX = "def cake(layers):\n    return ", "\n\nprint(cake(3))\n"


SERVED_MODEL = "tiny_llama_fim"  # the server and client fixtures: tests/integration/conftest.py


def test_the_middle_is_the_completion_of_the_prefix_suffix_middle_prompt(
    client: OpenAI, server: ServerHandle, tiny_llama_fim: Path
) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    assert fim_tokens(tokenizer) is not None
    prefix_id, suffix_id, middle_id = fim_tokens(tokenizer)
    middle = client.completions.create(model="x", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0)
    ids = [prefix_id, *tokenizer.encode(PREFIX), suffix_id, *tokenizer.encode(SUFFIX), middle_id]
    expected = client.completions.create(model="x", prompt=ids, max_tokens=12, temperature=0)
    assert middle.choices[0].text == expected.choices[0].text
    assert middle.usage is not None and middle.usage.prompt_tokens == len(ids)
    plain = client.completions.create(model="x", prompt=PREFIX, max_tokens=12, temperature=0)
    assert plain.usage is not None and plain.usage.prompt_tokens == len(tokenizer.encode(PREFIX))
    streamed = client.completions.create(
        model="x", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == middle.choices[0].text


def test_a_fill_in_the_middle_marker_ends_the_middle(server: ServerHandle, tiny_llama_fim: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    assert fim_tokens(tokenizer) is not None
    prefix_id = fim_tokens(tokenizer)[0]
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4, "logit_bias": {str(prefix_id): 100}}
    answer = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"suffix": 3}, "suffix must be a string"),
        ({"suffix": "x", "echo": True}, "echo"),
        ({"suffix": "x", "truncate_prompt_tokens": 4}, "truncate_prompt_tokens cannot be combined with suffix"),
    ],
)
def test_bad_suffixes_are_named(server: ServerHandle, extra: dict[str, object], needle: str) -> None:
    answer = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "a", "max_tokens": 2, **extra})
    assert answer.status_code == 400 and needle in answer.json()["error"]


def test_infill_is_llama_cpps_fill_in_the_middle(client: OpenAI, server: ServerHandle, tiny_llama_fim: Path) -> None:
    """/infill's middle is the completion of llama.cpp's prompt: the typed start of the line after the prefix."""
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    assert fim_tokens(tokenizer) is not None
    prefix_id, suffix_id, middle_id = fim_tokens(tokenizer)
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "cake", "n_predict": 8, "temperature": 0}
    answer = httpx.post(f"{server.base_url}/infill", json=body, timeout=60).json()
    text = tokenizer.encode_literal
    ids = [prefix_id, *text(PREFIX), *text("cake"), suffix_id, *text(SUFFIX), middle_id]
    assert fim_prompt(tokenizer, PREFIX, SUFFIX, typed="cake") == ids
    expected = client.completions.create(model="x", prompt=ids, max_tokens=8, temperature=0)
    assert answer["content"] == expected.choices[0].text and answer["stop"] is True
    assert (answer["tokens_predicted"], answer["tokens_evaluated"]) == (8, len(ids))
    assert answer["stop_type"] == "limit" and answer["timings"]["predicted_n"] == 8
    assert answer["timings"]["predicted_ms"] > 0 and answer["timings"]["predicted_per_second"] > 0
    settings = answer["generation_settings"]
    assert (settings["n_ctx"], settings["n_predict"], settings["temperature"], settings["top_k"]) == (512, 8, 0, 40)
    with httpx.stream("POST", f"{server.base_url}/infill", json={**body, "stream": True}, timeout=60) as raw:
        events = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: ")]
    assert "".join(event["content"] for event in events) == answer["content"]
    assert [event["stop"] for event in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["tokens_predicted"] == 8


def test_n_predict_0_reads_the_prompt_into_the_cache(server: ServerHandle) -> None:
    """The editors' warm-up request: nothing is generated, and the next request finds the prompt cached."""
    body = {"input_prefix": PREFIX * 4, "input_suffix": SUFFIX, "temperature": 0}
    warm = httpx.post(f"{server.base_url}/infill", json={**body, "n_predict": 0}, timeout=60).json()
    assert (warm["content"], warm["tokens_predicted"], warm["stop_type"]) == ("", 0, "limit")
    answer = httpx.post(f"{server.base_url}/infill", json={**body, "n_predict": 2}, timeout=60).json()
    assert answer["tokens_cached"] > answer["tokens_evaluated"] // 2


def test_code_naming_special_tokens_stays_text(server: ServerHandle, tiny_llama_fim: Path) -> None:
    """llama.cpp reads the code as text: a FIM marker's name written in it is not the marker."""
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    assert fim_tokens(tokenizer) is not None
    prefix = 'MARKER = "<|fim_prefix|>"\n'
    ids = fim_prompt(tokenizer, prefix, "<|fim_middle|>")
    assert ids.count(fim_tokens(tokenizer)[0]) == 1 and ids.count(fim_tokens(tokenizer)[2]) == 1
    body = {"input_prefix": prefix, "input_suffix": "<|fim_middle|>", "n_predict": 1}
    answer = httpx.post(f"{server.base_url}/infill", json=body, timeout=60).json()
    assert answer["tokens_evaluated"] == len(ids)


def test_infill_puts_other_files_first_and_stops_like_llama_cpp(server: ServerHandle, tiny_llama_fim: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    assert fim_tokens(tokenizer) is not None
    files = [("oven.py", "HEAT = 180\n")]
    ids = fim_prompt(tokenizer, PREFIX, SUFFIX, files=files)
    chunk = tokenizer.encode_literal("\n\n--- snippet ---\n\nHEAT = 180\n")
    assert ids[: len(chunk)] == chunk  # no repository tokens in this model: each chunk after a snippet line
    assert ids[len(chunk)] == fim_tokens(tokenizer)[0] and ids[-1] == fim_tokens(tokenizer)[2]
    body = {
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "input_extra": [{"filename": name, "text": text} for name, text in files],
        "n_predict": 6,
        "temperature": 0,
    }
    answer = httpx.post(f"{server.base_url}/infill", json=body, timeout=60).json()
    assert answer["tokens_evaluated"] == len(ids)
    content = answer["content"]
    assert len(content) >= 2 and answer["stop_type"] == "limit"
    stopped = httpx.post(f"{server.base_url}/infill", json={**body, "stop": [content[-1]]}, timeout=60).json()
    assert stopped["stop_type"] == "word" and stopped["content"] == content[: content.index(content[-1])]


def test_a_request_past_the_context_is_cut_to_fit_as_llama_cpp_does(server: ServerHandle, tiny_llama_fim: Path) -> None:
    """Other files' oldest chunks go first, then the prefix's start and the suffix's end: the answer comes."""
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    chunks = [{"filename": f"f{index}.py", "text": f"VALUE_{index} = {index}\n" * 4} for index in range(30)]
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": chunks, "n_predict": 4, "temperature": 0}
    answer = httpx.post(f"{server.base_url}/infill", json=body, timeout=60).json()
    assert answer["truncated"] is True and answer["tokens_predicted"] == 4
    assert answer["tokens_evaluated"] <= 512 - 4
    kept = fim_prompt(tokenizer, PREFIX, SUFFIX, files=[(c["filename"], c["text"]) for c in chunks[-3:]])
    assert answer["tokens_evaluated"] >= len(kept)  # the newest chunks stayed
    long_prefix = "".join(f"step_{index} = bake(step_{index - 1})\n" for index in range(400))
    cut = httpx.post(f"{server.base_url}/infill", json={**body, "input_extra": [], "input_prefix": long_prefix}).json()
    assert cut["truncated"] is True and cut["tokens_evaluated"] == 512 - 4
    whole = httpx.post(f"{server.base_url}/infill", json={**body, "input_extra": []}, timeout=60).json()
    assert whole["truncated"] is False


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input_prefix": 3}, "input_prefix"),
        ({"input_extra": [{"text": 5}]}, "input_extra"),
        ({"input_extra": [{"filename": "a.py"}]}, "input_extra"),
        ({"n_predict": -2}, "n_predict"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_infill_fields_are_named(server: ServerHandle, body: dict[str, object], needle: str) -> None:
    answer = httpx.post(f"{server.base_url}/infill", json=body, timeout=60)
    assert answer.status_code == 400 and needle in answer.json()["error"]


@pytest.mark.parametrize(
    ("field", "needle"),
    [
        ({"stream": "yes"}, "stream must be true or false"),
        ({"return_tokens": "yes"}, "return_tokens must be true or false"),
        ({"timings_per_token": "yes"}, "timings_per_token must be true or false"),
        ({"response_fields": "content"}, "response_fields must be a list"),
    ],
)
def test_a_bad_flag_leaves_nothing_running(server: ServerHandle, field: dict[str, object], needle: str) -> None:
    """The 400 comes before the prompt is submitted: it used to leave a generation running to the context's end."""
    engine = server.state.engine
    assert engine is not None
    before = engine.stats.tokens_generated
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "ignore_eos": True, **field}
    answer = httpx.post(f"{server.base_url}/infill", json=body, timeout=60)
    assert answer.status_code == 400 and needle in answer.json()["error"]
    time.sleep(0.5)
    assert not engine.running() and engine.stats.tokens_generated == before


def test_infill_needs_fill_in_the_middle_tokens(tiny_llama: Path) -> None:
    with running_server(tiny_settings(tiny_llama)) as handle:
        answer = httpx.post(f"{handle.base_url}/infill", json={"input_prefix": "a"}, timeout=60)
    assert answer.status_code == 400 and "fill-in-the-middle tokens" in answer.json()["error"]


def test_the_start_of_a_file_is_filled_in_too(client: OpenAI, tiny_llama_fim: Path) -> None:
    """An empty prefix (the cursor at the top of the file) is a prompt with a suffix."""
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    answer = client.completions.create(model="x", prompt="", suffix=SUFFIX, max_tokens=3, temperature=0)
    assert answer.usage is not None and answer.usage.prompt_tokens == len(fim_prompt(tokenizer, "", SUFFIX))


def test_infill_takes_completions_grammar_and_return_tokens(server: ServerHandle) -> None:
    """llama.cpp's /infill takes /completion's options: a grammar (or json_schema) holds the middle, return_tokens
    gives its ids, response_fields picks the answer's fields (they were ignored: a free middle, `tokens: []`)."""
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "temperature": 0.8, "seed": 3}
    held = httpx.post(f"{server.base_url}/infill", json={**body, "grammar": 'root ::= "7" | "8"'}, timeout=60).json()
    assert held["content"] in ("7", "8") and held["stop_type"] == "eos"
    schema = {**body, "json_schema": {"type": "integer"}, "n_predict": 6}
    assert httpx.post(f"{server.base_url}/infill", json=schema, timeout=60).json()["content"].lstrip("-").isdigit()
    tokens = {**body, "n_predict": 3, "return_tokens": True, "response_fields": ["tokens", "generation_settings/seed"]}
    answer = httpx.post(f"{server.base_url}/infill", json=tokens, timeout=60).json()
    assert set(answer) == {"tokens", "generation_settings/seed"} and len(answer["tokens"]) == 3
    assert answer["generation_settings/seed"] == 3
