"""llama.cpp's sampler fields on the OpenAI-compatible routes (/v1/completions, /v1/chat/completions and its /api/v1
alias, /v1/responses) and Anthropic's /v1/messages, sent as the official `openai` client sends extra fields
(`extra_body`), on a real uvicorn server with the tiny Llama: the same settings and seed draw the same tokens as
llama.cpp's /completion, each group changes a sampled answer, neutral values change nothing, `repeat_penalty` is
`repetition_penalty` by its llama.cpp name, and a bad value is a 400 naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from cake_py.models.tokenizer import Tokenizer
from tests.fixtures.server import ServerHandle

SERVED_MODEL = "tiny_llama"  # the server and client fixtures (tests/integration/conftest.py)
PROMPT = "the cake is a cake is a cake is"  # repeats: DRY has something to penalise
# The chat's prompt ends with the same repeats: the assistant's answer so far, continued.
CHAT = {
    "messages": [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": PROMPT}],
    "add_generation_prompt": False,
    "continue_final_message": True,
}
# Sampled (not greedy), /completion's defaults sent explicitly so that both routes start alike; top-k off, so that
# a penalised token has a part in the draw (a random model's likely ones are not those its prompt repeats).
COMMON = {"temperature": 0.8, "top_k": 0, "top_p": 0.95, "min_p": 0.05, "seed": 7, "ignore_eos": True}
LENGTH = 12
GROUPS = {
    "mirostat": {"mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2},
    "mirostat_1": {"mirostat": 1},
    "xtc": {"xtc_probability": 0.9, "xtc_threshold": 0.01},
    "dry": {"dry_multiplier": 3.0, "dry_allowed_length": 0, "dry_base": 2.0, "dry_sequence_breakers": ["§§"]},
    "typical": {"typical_p": 0.5, "min_keep": 2},
    "top_n_sigma": {"top_n_sigma": 0.5},
    "dynatemp": {"dynatemp_range": 0.7, "dynatemp_exponent": 2.0},
    "samplers": {"samplers": ["temperature", "top_k", "top_p"]},
    "samplers_letters": {"samplers": "tk"},
    "penalties": {"repeat_penalty": 1.5, "repeat_last_n": 4, "dry_penalty_last_n": 8},
}
NEUTRAL = {
    **{"typical_p": 1.0, "min_keep": 0, "top_n_sigma": -1.0, "xtc_probability": 0.0, "dry_multiplier": 0.0},
    **{"mirostat": 0, "dynatemp_range": 0.0, "dry_sequence_breakers": ["\n"]},
}


def completion(server: ServerHandle, prompt: str | list[int], fields: dict[str, Any]) -> str:
    """llama.cpp's /completion: the reference these routes must agree with."""
    body = {"prompt": prompt, "n_predict": LENGTH, **COMMON, **fields}
    answer = httpx.post(f"{server.base_url}/completion", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["content"])


def v1_completion(client: OpenAI, fields: dict[str, Any], sampling: dict[str, Any] = COMMON) -> str:
    answer = client.completions.create(model="x", prompt=PROMPT, max_tokens=LENGTH, extra_body={**sampling, **fields})
    return answer.choices[0].text


def chat(client: OpenAI, fields: dict[str, Any], sampling: dict[str, Any] = COMMON, continued: bool = True) -> str:
    """CHAT's answer, or (not `continued`) the answer to PROMPT as a user's message."""
    template = {key: CHAT[key] for key in ("add_generation_prompt", "continue_final_message")} if continued else {}
    messages = CHAT["messages"] if continued else [{"role": "user", "content": PROMPT}]
    answer = client.chat.completions.create(
        model="x", messages=messages, max_tokens=LENGTH, extra_body={**template, **sampling, **fields}
    )
    return answer.choices[0].message.content or ""


def chat_prompt_ids(server: ServerHandle) -> list[int]:
    """The token ids of the chat's prompt, as /v1/chat/completions renders it (/tokenize with `messages`)."""
    answer = httpx.post(f"{server.base_url}/tokenize", json=CHAT, timeout=60)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["tokens"])


@pytest.mark.parametrize("group", GROUPS)
def test_the_v1_routes_draw_what_completion_draws(server: ServerHandle, client: OpenAI, group: str) -> None:
    """Each group changes /completion's sampled answer; sent to the /v1 routes, it gives /completion's answer."""
    fields = GROUPS[group]
    expected = completion(server, PROMPT, fields)
    assert expected != completion(server, PROMPT, {})  # the group matters here: an ignored one would show
    assert v1_completion(client, fields) == expected
    in_chat = completion(server, chat_prompt_ids(server), fields)
    assert in_chat != completion(server, chat_prompt_ids(server), {})
    assert chat(client, fields) == in_chat


def test_a_group_changes_the_sampled_answer_and_a_seed_repeats_it(client: OpenAI) -> None:
    plain = v1_completion(client, {})
    for fields in (GROUPS["mirostat"], GROUPS["xtc"], GROUPS["typical"]):
        answer = v1_completion(client, fields)
        assert answer != plain and v1_completion(client, fields) == answer, fields
        assert chat(client, fields) != chat(client, {})


def test_neutral_values_change_nothing(client: OpenAI) -> None:
    """Without top-k, top-p or min-p the temperature's place in the chain changes nothing either: the same draws."""
    sampling = {"temperature": 0.9, "seed": 3, "ignore_eos": True}
    assert v1_completion(client, NEUTRAL, sampling) == v1_completion(client, {}, sampling)
    assert chat(client, NEUTRAL, sampling) == chat(client, {}, sampling)


def test_neutral_values_put_the_temperature_last_as_llama_cpp_does(server: ServerHandle, client: OpenAI) -> None:
    """Sent with top-p and min-p, llama.cpp's fields bring llama.cpp's order (the temperature after them), as on
    /completion: the answer is /completion's."""
    assert v1_completion(client, NEUTRAL) == completion(server, PROMPT, {})


def test_dry_on_a_greedy_loop_in_the_chat(server: ServerHandle, tiny_llama: Path) -> None:
    """Greedy, with two tokens favoured, the tiny model loops over them; DRY (a multiplier far above the bias)
    breaks the loop, on both chat paths as on /completion."""
    favoured = [Tokenizer.from_folder(tiny_llama).encode_literal(text) for text in ("%", "&")]
    assert all(len(ids) == 1 for ids in favoured)
    greedy = {"temperature": 0, "ignore_eos": True}
    dry = {"dry_multiplier": 50.0, "dry_sequence_breakers": ["§§"]}

    def chat_tokens(fields: dict[str, Any], path: str = "/v1/chat/completions") -> list[str]:
        body = {**CHAT, "max_tokens": 40, "logprobs": True, **greedy, **fields}
        body["logit_bias"] = {str(ids[0]): 10 for ids in favoured}
        answer = httpx.post(f"{server.base_url}{path}", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return [entry["token"] for entry in answer.json()["choices"][0]["logprobs"]["content"]]

    def repeated(tokens: list[str]) -> int:
        grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
        return len(grams) - len(set(grams))

    plain = chat_tokens({})
    assert set(plain) == {"%", "&"} and repeated(plain) > 25  # the loop to break
    broken = chat_tokens(dry)
    assert repeated(broken) < 20 and chat_tokens(dry, "/api/v1/chat/completions") == broken
    body = {"prompt": chat_prompt_ids(server), "n_predict": 40, **greedy, **dry}
    body["logit_bias"] = [[ids[0], 10] for ids in favoured]
    reference = httpx.post(f"{server.base_url}/completion", json=body, timeout=60).json()["content"]
    assert "".join(broken) == reference


def test_responses_pass_the_fields_on(client: OpenAI) -> None:
    fields = GROUPS["mirostat"]
    sampling = {key: COMMON[key] for key in ("top_k", "min_p", "seed", "ignore_eos")}
    response = client.responses.create(
        model="x",
        input=PROMPT,
        max_output_tokens=LENGTH,
        temperature=COMMON["temperature"],
        top_p=COMMON["top_p"],
        extra_body={**sampling, **fields},
    )
    assert response.output_text == chat(client, fields, continued=False)
    assert response.output_text != chat(client, {}, continued=False)


def test_anthropic_messages_pass_the_fields_on(server: ServerHandle, client: OpenAI) -> None:
    fields = GROUPS["mirostat"]

    def message(extra: dict[str, Any]) -> str:
        body = {"model": "x", "max_tokens": LENGTH, "messages": [{"role": "user", "content": PROMPT}], **COMMON}
        answer = httpx.post(f"{server.base_url}/v1/messages", json={**body, **extra}, timeout=60)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["content"][0]["text"])

    assert message(fields) == chat(client, fields, continued=False)
    assert message(fields) != message({})
    refused = httpx.post(
        f"{server.base_url}/v1/messages",
        json={"model": "x", "max_tokens": 2, "messages": [{"role": "user", "content": "a"}], "mirostat": 3},
        timeout=60,
    )
    assert refused.status_code == 400 and "mirostat" in refused.text, refused.text


def test_repeat_penalty_is_repetition_penalty_by_llama_cpps_name(client: OpenAI) -> None:
    """Over every token (no repeat_last_n) they are one penalty; both sent must agree; repeat_last_n 0 turns it off."""
    sampling = {**COMMON, "repeat_last_n": -1}
    llama_name = v1_completion(client, {"repeat_penalty": 1.5}, sampling)
    assert llama_name == v1_completion(client, {"repetition_penalty": 1.5}, COMMON)
    assert llama_name != v1_completion(client, {}, COMMON)
    assert v1_completion(client, {"repeat_penalty": 1.5, "repetition_penalty": 1.5}, COMMON) == llama_name
    assert v1_completion(client, {"repeat_penalty": 1.5, "repeat_last_n": 0}, COMMON) == v1_completion(client, {})
    with pytest.raises(openai.BadRequestError) as refused:
        v1_completion(client, {"repeat_penalty": 1.5, "repetition_penalty": 1.2})
    assert "repeat_penalty (1.5) and repetition_penalty (1.2)" in refused.value.response.json()["error"]


BAD = [
    ("typical_p", 1.5, "typical_p must be between 0 and 1, got 1.5"),
    ("min_keep", 1.5, "min_keep must be an integer"),
    ("xtc_probability", 2, "xtc_probability must be between 0 and 1, got 2"),
    ("dry_multiplier", -1, "dry_multiplier must be 0 or more, got -1"),
    ("dry_penalty_last_n", -2, "dry_penalty_last_n must be -1 (the whole context), 0 (off) or more, got -2"),
    ("dry_sequence_breakers", [], "dry_sequence_breakers must be a non-empty array of strings"),
    ("mirostat", 3, "mirostat must be 0 (off), 1 or 2, got 3"),
    ("mirostat_eta", "fast", "mirostat_eta must be a number"),
    ("dynatemp_range", -0.5, "dynatemp_range must be 0 or more, got -0.5"),
    ("top_n_sigma", "wide", "top_n_sigma must be a number"),
    ("samplers", ["top_k", "nucleus"], "unknown sampler 'nucleus'"),
    ("samplers", "kq", "unknown sampler letter 'q'"),
    ("repeat_penalty", 20, "repeat_penalty must be in (0, 10], got 20"),
    ("repeat_penalty", "strong", "repeat_penalty must be a number"),
    ("repeat_last_n", -2, "repeat_last_n must be -1 (every token), 0 (off) or more, got -2"),
]


@pytest.mark.parametrize(("field", "value", "needle"), BAD)
def test_bad_values_are_400s_naming_the_field(server: ServerHandle, field: str, value: Any, needle: str) -> None:
    bodies = {
        "/v1/completions": {"prompt": "a", "max_tokens": 2},
        "/v1/chat/completions": {**CHAT, "max_tokens": 2},
        "/api/v1/chat/completions": {**CHAT, "max_tokens": 2},
        "/v1/responses": {"input": "a", "max_output_tokens": 2},
    }
    for path, body in bodies.items():
        answer = httpx.post(f"{server.base_url}{path}", json={**body, field: value}, timeout=60)
        assert answer.status_code == 400, (path, answer.text)
        error = answer.json()["error"]
        assert needle in (error["message"] if isinstance(error, dict) else error), (path, answer.text)
