"""llama.cpp's native /completion (and /completions) and /props against a real uvicorn server on the tiny Llama:
its prompt shapes, its completion object blocking and streamed, token probabilities, stop words, grammars,
logit_bias pairs, and the answers agreeing with what /v1/completions generates for the same tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from cake_py.models.tokenizer import Tokenizer
from tests.fixtures.server import ServerHandle, running_server, slow_steps, tiny_settings

SERVED_MODEL = "tiny_llama"  # the server and client fixtures: tests/integration/conftest.py
GREEDY = {"temperature": 0, "n_predict": 8}


def post(server: ServerHandle, body: dict[str, Any], path: str = "/completion") -> Any:
    answer = httpx.post(f"{server.base_url}{path}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def events(server: ServerHandle, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{server.base_url}/completion", json={**body, "stream": True}, timeout=60) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and "data: [DONE]" not in lines  # llama.cpp sends none
    return [json.loads(line[6:]) for line in lines]


def test_a_completion_is_what_v1_completions_generates(server: ServerHandle, client: OpenAI) -> None:
    answer = post(server, {"prompt": "Once upon a time", **GREEDY})
    openai = client.completions.create(model="x", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert answer["content"] == openai.choices[0].text
    assert openai.usage is not None
    assert (answer["tokens_predicted"], answer["tokens_evaluated"]) == (8, openai.usage.prompt_tokens)
    assert (answer["stop"], answer["stop_type"], answer["stopping_word"], answer["index"]) == (True, "limit", "", 0)
    assert answer["prompt"] == "Once upon a time" and answer["truncated"] is False
    assert server.state.engine is not None
    assert answer["generation_settings"]["n_ctx"] == server.state.engine.context_length
    assert answer["generation_settings"]["n_predict"] == 8 and answer["timings"]["predicted_n"] == 8
    assert post(server, {"prompt": "Once upon a time", **GREEDY}, "/completions")["content"] == answer["content"]


def test_token_ids_and_mixed_prompts(server: ServerHandle, tiny_llama: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama)
    head = tokenizer.encode("Once upon")
    tail = tokenizer.encode(" a time", add_special_tokens=False)
    by_ids = post(server, {"prompt": head + tail, **GREEDY})
    mixed = post(server, {"prompt": [*head, " a time"], **GREEDY})  # a later string gets no BOS
    assert mixed["content"] == by_ids["content"] and mixed["tokens_evaluated"] == len(head) + len(tail)
    assert by_ids["prompt"] == tokenizer.decode(head + tail, skip_special_tokens=False)


def test_several_prompts_get_a_list_of_answers(server: ServerHandle) -> None:
    prompts = ["Once upon a time", "The cake is"]
    answers = post(server, {"prompt": prompts, **GREEDY})
    assert [a["index"] for a in answers] == [0, 1]
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer["content"] == post(server, {"prompt": prompt, **GREEDY})["content"]
    streamed = events(server, {"prompt": prompts, **GREEDY})
    for index, answer in enumerate(answers):
        mine = [event for event in streamed if event["index"] == index]
        assert "".join(event["content"] for event in mine) == answer["content"]
        assert [event["stop"] for event in mine].count(True) == 1 and mine[-1]["stop"]


def test_a_streamed_completion_ends_with_the_whole_object(server: ServerHandle) -> None:
    blocking = post(server, {"prompt": "The cake is", **GREEDY})
    streamed = events(server, {"prompt": "The cake is", **GREEDY})
    pieces, last = streamed[:-1], streamed[-1]
    assert all(not event["stop"] for event in pieces)
    assert "".join(event["content"] for event in pieces) == blocking["content"]
    assert last["stop"] and last["content"] == "" and last["tokens_predicted"] == 8 and "timings" in last


def test_token_probabilities_and_tokens(server: ServerHandle, tiny_llama: Path) -> None:
    answer = post(server, {"prompt": "The cake is", "n_probs": 3, "return_tokens": True, **GREEDY})
    probabilities, tokens = answer["completion_probabilities"], answer["tokens"]
    assert len(probabilities) == len(tokens) == 8
    assert Tokenizer.from_folder(tiny_llama).decode(tokens) == answer["content"]
    for token_id, entry in zip(tokens, probabilities, strict=True):
        assert entry["id"] == token_id and len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(max(top["logprob"] for top in entry["top_logprobs"]))  # greedy
        assert entry["top_logprobs"][0]["id"] == token_id
    streamed = events(server, {"prompt": "The cake is", "n_probs": 3, "return_tokens": True, **GREEDY})
    assert [t for event in streamed[:-1] for t in event["tokens"]] == tokens
    assert len([p for event in streamed[:-1] for p in event["completion_probabilities"]]) == 8


def test_a_stop_word_is_named(server: ServerHandle) -> None:
    content = post(server, {"prompt": "The cake is", **GREEDY})["content"]
    word = content[3:5]
    assert word.strip(), content
    stopped = post(server, {"prompt": "The cake is", "stop": ["NOT-THERE", word], **GREEDY})
    assert (stopped["stop_type"], stopped["stopping_word"]) == ("word", word)
    assert stopped["content"] == content[: content.index(word)]


def test_a_stop_words_tokens_leave_with_its_text(server: ServerHandle, tiny_llama: Path) -> None:
    """As llama.cpp's: `tokens` and `completion_probabilities` were the content's plus the stop word's."""
    tokenizer = Tokenizer.from_folder(tiny_llama)
    whole = post(server, {"prompt": "The cake is", "return_tokens": True, **GREEDY})

    def a_clean_stop(index: int) -> bool:  # one token's text, found once in the answer: it stops right there
        text = tokenizer.decode([whole["tokens"][index]])
        return bool(text.strip()) and whole["content"].count(text) == 1 and len(tokenizer.encode_literal(text)) == 1

    at = next(index for index in range(2, len(whole["tokens"])) if a_clean_stop(index))
    word = tokenizer.decode([whole["tokens"][at]])
    stopped = post(server, {"prompt": "The cake is", "stop": [word], "n_probs": 1, "return_tokens": True, **GREEDY})
    assert stopped["stop_type"] == "word" and stopped["tokens"] == whole["tokens"][:at]
    probabilities = stopped["completion_probabilities"]
    assert b"".join(bytes(entry["bytes"]) for entry in probabilities).decode(errors="replace") == stopped["content"]


def test_a_context_that_fills_is_truncated_and_settings_are_the_requests(tiny_llama: Path) -> None:
    with running_server(tiny_settings(tiny_llama, max_model_len=40)) as small:
        full = post(small, {"prompt": "The cake is", "n_predict": -1, "ignore_eos": True})
        assert full["stop_type"] == "limit" and full["truncated"] is True  # it said false
        short = post(small, {"prompt": "The cake is", "n_predict": 3, "repeat_last_n": 0})
        assert short["truncated"] is False and short["generation_settings"]["repeat_last_n"] == 0  # it said -1
        assert short["generation_settings"]["stream"] is False
        streamed = events(small, {"prompt": "The cake is", "n_predict": 3, **GREEDY})
        assert all(len(event["tokens"]) >= 1 for event in streamed[:-1])  # streamed chunks carry their tokens
        assert streamed[-1]["generation_settings"]["stream"] is True


def test_grammar_and_json_schema_hold_the_output(server: ServerHandle) -> None:
    answer = post(server, {"prompt": "Is it?", "grammar": 'root ::= "yes" | "no"', "temperature": 0.8, "seed": 1})
    assert answer["content"] in ("yes", "no") and answer["stop_type"] == "eos"
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    answer = post(server, {"prompt": "JSON:", "json_schema": schema, "n_predict": 40, "temperature": 0.8, "seed": 2})
    assert isinstance(json.loads(answer["content"])["n"], int)


def test_logit_bias_pairs_ban_or_favour_tokens(server: ServerHandle, tiny_llama: Path) -> None:
    first = post(server, {"prompt": "The cake is", "return_tokens": True, **GREEDY})["tokens"][0]
    banned = post(server, {"prompt": "The cake is", "return_tokens": True, "logit_bias": [[first, False]], **GREEDY})
    assert first not in banned["tokens"]
    favourite = Tokenizer.from_folder(tiny_llama).encode("zebra", add_special_tokens=False)[0]
    favoured = post(
        server, {"prompt": "The cake is", "return_tokens": True, "logit_bias": {str(favourite): 100}, **GREEDY}
    )
    assert set(favoured["tokens"]) == {favourite}
    # Not ids: "²" is text (str.isdigit() says digit, int() does not), a bias past float's range is the largest.
    zeros = post(
        server,
        {"prompt": "The cake is", "return_tokens": True, "logit_bias": {"0" * 5000 + str(favourite): 100}, **GREEDY},
    )
    assert set(zeros["tokens"]) == {favourite}  # leading zeros name the same token, however many
    for text in ("\u00b2", "--5"):
        assert isinstance(post(server, {"prompt": "The cake is", "logit_bias": {text: 1}, **GREEDY})["content"], str)
    huge_bias = {"prompt": "The cake is", "return_tokens": True, "logit_bias": [[favourite, 10**400]], **GREEDY}
    huge = post(server, huge_bias)
    assert set(huge["tokens"]) == {favourite}


WARM = "A long shared context that a client sends first, to have it read before the real request comes. " * 2


def test_n_predict_zero_only_reads_the_prompt(server: ServerHandle) -> None:
    answer = post(server, {"prompt": WARM, "n_predict": 0})
    assert (answer["content"], answer["tokens_predicted"], answer["stop_type"]) == ("", 0, "limit")
    again = post(server, {"prompt": WARM + "Now the question:", **GREEDY})
    assert again["tokens_cached"] >= answer["tokens_evaluated"] - 1  # the first left its prompt in the prefix cache
    (streamed,) = events(server, {"prompt": WARM, "n_predict": 0})
    assert streamed["stop"] and streamed["tokens_predicted"] == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "prompt must be"),
        ({"prompt": ""}, "prompt must be"),
        ({"prompt": [[1, 2], 3]}, "prompt must be"),
        ({"prompt": "a", "n_probs": 50}, "n_probs must be between 0 and 20"),
        ({"prompt": "a", "n_predict": -2}, "n_predict must be -1"),
        ({"prompt": "a", "grammar": "root ::= ("}, "grammar"),
        ({"prompt": "a", "grammar": 3}, "grammar must be a string"),
        ({"prompt": "a", "temperature": float("nan")}, "NaN is not a JSON number"),
        ({"prompt": "a", "logit_bias": [[5, float("inf")]]}, "Infinity is not a JSON number"),
        ({"prompt": "a", "logit_bias": {"9" * 5000: 1}}, "outside the vocabulary"),
        ({"prompt": "a", "logit_bias": {"-" + "0" * 5000 + "5": 1}}, "token id -5 is outside the vocabulary"),
        ({"prompt": "a", "logit_bias": {"-5": 1}}, "outside the vocabulary"),
        ({"prompt": "a", "repeat_last_n": -2}, "repeat_last_n must be -1"),
        ({"prompt": "a", "post_sampling_probs": True}, "post_sampling_probs is not supported"),
        ({"prompt": "a", "logit_bias": [[1, "high"]]}, "must be a number or false"),
        ({"prompt": "a", "logit_bias": [[10**9, 1]]}, "outside the vocabulary"),
        ({"prompt": [10**9]}, "outside the vocabulary"),
        ({"prompt": [15, 2.5]}, "2.5 is among its token ids"),  # it named 15, a good id
        ({"prompt": [15, None]}, "None is among its token ids"),
        ({"prompt": "a", "repeat_penalty": 0}, "repeat_penalty must be"),  # the field sent, not the engine's
    ],
    ids=lambda value: str(value)[:60],
)
def test_bad_requests_are_named(server: ServerHandle, body: dict[str, Any], needle: str) -> None:
    # Python's JSON writes NaN as NaN (as some clients' JSON libraries send it), which JSON has no word for.
    answer = httpx.post(f"{server.base_url}/completion", content=json.dumps(body), timeout=60)
    assert answer.status_code == 400 and needle in answer.json()["error"], answer.text


def test_props_describes_the_server(server: ServerHandle) -> None:
    props = httpx.get(f"{server.base_url}/props", timeout=60).json()
    engine = server.state.engine
    assert engine is not None
    assert props["total_slots"] == engine.max_running
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == engine.context_length and settings["params"]["temperature"] == 0.8
    assert settings["params"]["top_k"] == 40 and settings["params"]["n_predict"] == -1
    assert props["model_alias"] == server.state.model_name and isinstance(props["chat_template"], str)


def test_an_empty_grammar_is_none_and_a_grammar_wins_over_a_json_schema(server: ServerHandle) -> None:
    """SillyTavern sends `grammar: ""` with every request; llama.cpp reads it as no grammar."""
    free = post(server, {"prompt": "The cake is", "grammar": "", **GREEDY})
    assert free["content"] == post(server, {"prompt": "The cake is", **GREEDY})["content"]
    both = post(server, {"prompt": "Is it?", "grammar": 'root ::= "yes"', "json_schema": {"type": "integer"}})
    assert both["content"] == "yes"
    schema_only = post(server, {"prompt": "N:", "grammar": "", "json_schema": {"type": "integer"}, "n_predict": 6})
    assert schema_only["content"].lstrip("-").isdigit()


def test_probabilities_are_the_models_own_whatever_the_bias(server: ServerHandle) -> None:
    plain = post(server, {"prompt": "The cake is", "n_probs": 2, **GREEDY})["completion_probabilities"][0]
    forced_id = plain["top_logprobs"][1]["id"]  # the runner-up, forced by a +100 bias
    body = {"prompt": "The cake is", "n_probs": 2, "logit_bias": [[forced_id, 100]], **GREEDY}
    forced = post(server, body)["completion_probabilities"][0]
    assert forced["id"] == forced_id
    assert forced["logprob"] == pytest.approx(plain["top_logprobs"][1]["logprob"], abs=1e-4)  # not 0: unbiased
    assert forced["top_logprobs"][0]["id"] == plain["id"]


def test_repeat_penalty_weighs_only_the_last_repeat_last_n_tokens(server: ServerHandle) -> None:
    prompt = "cake " * 40
    plain = post(server, {"prompt": prompt, "return_tokens": True, **GREEDY})
    off = post(server, {"prompt": prompt, "repeat_penalty": 5.0, "repeat_last_n": 0, "return_tokens": True, **GREEDY})
    assert off["tokens"] == plain["tokens"]  # 0: no penalty at all
    everything = {"prompt": prompt, "repeat_penalty": 5.0, "repeat_last_n": -1, "return_tokens": True, **GREEDY}
    assert post(server, everything)["tokens"] != plain["tokens"]
    assert off["generation_settings"]["repeat_last_n"] in (0, -1)
    assert post(server, everything)["generation_settings"]["repeat_last_n"] == -1


def test_the_samplers_run_in_llama_cpps_order(server: ServerHandle) -> None:
    answer = httpx.post(f"{server.base_url}/completion", json={"prompt": "cake", "n_predict": 2}, timeout=60).json()
    assert answer["generation_settings"]["samplers"] == [
        "penalties",
        "dry",
        "top_n_sigma",
        "top_k",
        "typ_p",
        "top_p",
        "min_p",
        "xtc",
        "temperature",
    ]


def test_llama_cpps_other_fields(server: ServerHandle) -> None:
    answer = post(server, {"prompt": "The cake is", **GREEDY})
    assert answer["tokens"] == [] and answer["has_new_line"] == ("\n" in answer["content"])
    props = httpx.get(f"{server.base_url}/props", timeout=60).json()
    assert isinstance(props["bos_token"], str) and isinstance(props["eos_token"], str)


def test_slots_show_what_runs_without_its_prompt(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation in flight holds a slot (its progress, never its prompt's text); with every slot busy,
    fail_on_no_slot is a 503."""
    with running_server(tiny_settings(tiny_llama, max_running=1)) as server:
        # 400 tokens take 4 s or more: a fast machine had ended them before the slots were read
        slow_steps(monkeypatch, server, 0.01)
        url = f"{server.base_url}/slots"
        idle = httpx.get(url, timeout=30).json()
        assert [(slot["id"], slot["id_task"], slot["is_processing"]) for slot in idle] == [(0, -1, False)]
        assert idle[0]["params"]["temperature"] == 0.8 and idle[0]["next_token"]["n_remain"] == -1  # the defaults
        assert httpx.get(url, params={"fail_on_no_slot": 1}, timeout=30).status_code == 200
        body = {"prompt": "A secret prompt", "n_predict": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/completion", json=body, timeout=60) as answer:
            lines = answer.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            [busy] = httpx.get(url, timeout=30).json()
            full = httpx.get(url, params={"fail_on_no_slot": 1}, timeout=30)
        assert busy["is_processing"] and busy["id_task"] >= 0 and busy["prompt"] == ""
        assert "secret" not in json.dumps(busy)
        assert busy["params"]["n_predict"] == 400 and busy["next_token"]["n_decoded"] >= 1
        assert busy["next_token"]["n_remain"] == 400 - busy["next_token"]["n_decoded"]
        assert full.status_code == 503 and full.json()["error"] == "no slot available"


def test_response_fields_pick_the_answers_fields(server: ServerHandle) -> None:
    """llama.cpp's response_fields: only those fields, a nested one under its whole path, a missing one left out
    (the whole answer came back)."""
    fields = ["content", "generation_settings/n_predict", "timings/predicted_n", "no_such_field", "content/x"]
    answer = post(server, {"prompt": "The cake is", "response_fields": fields, **GREEDY})
    assert set(answer) == {"content", "generation_settings/n_predict", "timings/predicted_n"}
    assert answer["generation_settings/n_predict"] == 8 and answer["timings/predicted_n"] == 8
    assert answer["content"] == post(server, {"prompt": "The cake is", **GREEDY})["content"]
    streamed = events(server, {"prompt": "The cake is", "response_fields": ["stop_type"], **GREEDY})
    assert streamed[-1] == {"stop_type": "limit"} and all(not event["stop"] for event in streamed[:-1])
    bad = httpx.post(f"{server.base_url}/completion", json={"prompt": "a", "response_fields": "content"}, timeout=60)
    assert bad.status_code == 400 and "response_fields must be a list" in bad.json()["error"]


def test_n_cmpl_answers_each_prompt_that_many_times(server: ServerHandle) -> None:
    """llama.cpp's n_cmpl (alias n): prompts × n_cmpl answers, each prompt's together (one answer came back)."""
    answers = post(server, {"prompt": ["Once upon a time", "The cake is"], "n_cmpl": 2, **GREEDY})
    assert [answer["index"] for answer in answers] == [0, 1, 2, 3]
    first, second = (
        post(server, {"prompt": prompt, **GREEDY})["content"] for prompt in ("Once upon a time", "The cake is")
    )
    assert [answer["content"] for answer in answers] == [first, first, second, second]
    assert len(post(server, {"prompt": "The cake is", "n": 3, **GREEDY})) == 3
    streamed = events(server, {"prompt": "The cake is", "n_cmpl": 2, **GREEDY})
    assert sorted(event["index"] for event in streamed if event["stop"]) == [0, 1]
    for body in ({"n_cmpl": 0}, {"n_cmpl": 17}, {"prompt": ["a"] * 9, "n_cmpl": 2}, {"n": "2"}):
        bad = httpx.post(f"{server.base_url}/completion", json={"prompt": "a", **body}, timeout=60)
        assert bad.status_code == 400 and ("n_cmpl" in bad.text or "n must be" in bad.text), bad.text


def test_streamed_pieces_count_as_llama_cpps_and_carry_timings_when_asked(server: ServerHandle) -> None:
    """Each streamed piece has llama.cpp's counts (tokens_predicted so far, tokens_evaluated, id_slot), and with
    timings_per_token its timings so far (the pieces had neither)."""
    streamed = events(server, {"prompt": "The cake is", "timings_per_token": True, **GREEDY})
    pieces = [event for event in streamed if not event["stop"]]
    assert [piece["tokens_predicted"] for piece in pieces] == sorted(piece["tokens_predicted"] for piece in pieces)
    assert pieces[-1]["tokens_predicted"] == 8 and {piece["tokens_evaluated"] for piece in pieces} == {4}
    assert all(piece["id_slot"] == -1 for piece in pieces)
    timings = [piece["timings"] for piece in pieces]
    assert [t["predicted_n"] for t in timings] == [piece["tokens_predicted"] for piece in pieces]
    assert all(t["prompt_n"] + t["cache_n"] == 4 and t["prompt_ms"] >= 0 for t in timings)
    assert all("timings" not in piece for piece in events(server, {"prompt": "The cake is", **GREEDY})[:-1])


def test_max_tokens_stands_for_n_predict_when_it_is_not_sent(server: ServerHandle) -> None:
    """llama.cpp reads OpenAI's max_tokens when n_predict is absent (it was ignored: the answer ran to the context)."""
    answer = post(server, {"prompt": "The cake is", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert answer["tokens_predicted"] == 3 and answer["generation_settings"]["n_predict"] == 3
    both = {"prompt": "The cake is", "max_tokens": 3, "n_predict": 5, "temperature": 0, "ignore_eos": True}
    assert post(server, both)["tokens_predicted"] == 5
    bad = httpx.post(f"{server.base_url}/completion", json={"prompt": "a", "max_tokens": -2}, timeout=60)
    assert bad.status_code == 400 and "max_tokens must be -1" in bad.json()["error"]
