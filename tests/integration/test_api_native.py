"""Seed 000/001 native routes over a real uvicorn server: JSON /generate, /chat, /generate/batch, the multipart
/generate as curl sends it, system info, metrics, and the honest statuses of engine failures."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cake_py.errors import ModelError, StageError
from tests.fixtures.server import ServerHandle, running_server, tiny_settings

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama)) as handle:
        yield handle


@pytest.fixture(scope="module")
def http(server: ServerHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def _sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_generate_json_blocking_uses_the_raw_prompt(http: httpx.Client, server: ServerHandle) -> None:
    response = http.post("/generate", json={"prompt": "The oven", "max_length": 6, "do_sample": False})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"response", "finish_reason", "usage"}
    assert server.state.source is not None
    n_prompt = len(server.state.source.tokenizer.encode("The oven"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6, "total_tokens": n_prompt + 6}
    again = http.post("/generate", json={"prompt": "The oven", "max_length": 6, "do_sample": False})
    assert again.json()["response"] == body["response"]  # do_sample false is greedy


def test_generate_json_stream_is_sse_ending_in_done(http: httpx.Client) -> None:
    blocking = http.post("/generate", json={"prompt": "The oven", "max_length": 6, "do_sample": False}).json()
    request = {"prompt": "The oven", "max_length": 6, "do_sample": False, "stream": True}
    with http.stream("POST", "/generate", json=request) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["text"] for chunk in chunks) == blocking["response"]
    assert chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == blocking["usage"]


def test_chat_blocking_and_streaming(http: httpx.Client, server: ServerHandle) -> None:
    messages = [{"role": "system", "content": "You bake."}, {"role": "user", "content": "Hello"}]
    body = http.post("/chat", json={"messages": messages, "max_length": 5, "do_sample": False}).json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert server.state.source is not None
    assert body["usage"]["prompt_tokens"] == len(server.state.source.tokenizer.encode_chat(messages))
    with http.stream(
        "POST", "/chat", json={"messages": messages, "max_length": 5, "do_sample": False, "stream": True}
    ) as r:
        events = _sse_events(r)
    assert "".join(json.loads(e)["text"] for e in events[:-1]) == body["choices"][0]["message"]["content"]


def test_batch_prompts_run_together_in_the_engine(http: httpx.Client, server: ServerHandle) -> None:
    engine = server.state.engine
    assert engine is not None
    steps, tokens = engine.stats.steps, engine.stats.tokens_generated
    prompts = ["The oven", "A quick cake", "Paris is"]
    response = http.post("/generate/batch", json={"prompts": prompts, "max_length": 8, "do_sample": False})
    assert response.status_code == 200
    body = response.json()
    batch_steps, generated = engine.stats.steps - steps, engine.stats.tokens_generated - tokens
    assert len(body["responses"]) == 3
    assert generated == body["usage"]["completion_tokens"]
    # Together: about one step per token of the longest answer; one at a time it would be a step per token.
    assert batch_steps <= 8 + 2
    assert batch_steps < generated
    singles = [http.post("/generate", json={"prompt": p, "max_length": 8, "do_sample": False}).json() for p in prompts]
    assert body["responses"] == [single["response"] for single in singles]


def test_native_errors_are_detail_with_seed_001_statuses(http: httpx.Client) -> None:
    too_long = http.post("/generate", json={"prompt": "cake " * 600})
    assert too_long.status_code == 413
    assert "512 tokens" in too_long.json()["detail"]
    bad = http.post("/chat", json={"messages": [{"role": "user", "content": "hi"}], "top_p": 2})
    assert bad.status_code == 400
    assert bad.json() == {"detail": "top_p must be between 0 and 1, got 2.0"}
    other_model = http.post("/generate", json={"prompt": "hi", "model_id": "microsoft/phi-2"})
    assert other_model.status_code == 404
    assert "'microsoft/phi-2'" in other_model.json()["detail"]
    batch = http.post("/generate/batch", json={"prompts": ["ok", "cake " * 600]})
    assert batch.status_code == 413
    assert batch.json()["detail"].startswith("prompts[1]:")
    # One far too long to tokenize is refused by the tokenizer: it lost its index, the batch's only way to name it.
    huge = http.post("/generate/batch", json={"prompts": ["ok", "ok", "cake " * 25_000]})
    assert huge.status_code == 413 and huge.json()["detail"].startswith("prompts[2]: the text has"), huge.text
    assert http.post("/generate/batch", json={"prompts": []}).status_code == 400


def _curl(server: ServerHandle, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["curl", "-sS", "-w", "\n%{http_code}", f"{server.base_url}/generate", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def _split(result: subprocess.CompletedProcess[str]) -> tuple[str, int]:
    body, _, status = result.stdout.rpartition("\n")
    return body, int(status)


@needs_curl
def test_multipart_generate_as_curl_sends_it(server: ServerHandle) -> None:
    kwargs = '{"max_output_tokens": 6, "do_sample": false}'
    body, status = _split(
        _curl(
            server,
            "-F",
            "text=Hello",
            "-F",
            "streaming=false",
            "-F",
            f"model_kwargs={kwargs}",
            "-F",
            "request_id=req-42",
        )
    )
    assert status == 200
    answer = json.loads(body)
    assert answer["request_id"] == "req-42"
    (output,) = answer["outputs"]["text"]
    text = base64.b64decode(output["data"]).decode("utf-8")
    assert output["metadata"]["finish_reason"] == "length"
    assert output["metadata"]["usage"]["completion_tokens"] == 6
    stream_body, stream_status = _split(
        _curl(server, "-N", "-F", "text=Hello", "-F", "streaming=true", "-F", f"model_kwargs={kwargs}")
    )
    assert stream_status == 200
    events = [json.loads(line) for line in stream_body.splitlines() if line]
    assert len({event["request_id"] for event in events}) == 1
    assert all(event["modality"] == "text" for event in events)
    assert "".join(base64.b64decode(event["data"]).decode("utf-8") for event in events) == text
    assert events[-1]["done"] is True
    assert events[-1]["metadata"]["usage"]["completion_tokens"] == 6


@needs_curl
def test_a_json_body_sent_with_curl_d_alone_is_read_as_json(server: ServerHandle) -> None:
    """`curl -d '{…}'` without -H labels the body application/x-www-form-urlencoded."""
    body, status = _split(_curl(server, "-d", '{"prompt": "The oven", "max_length": 3, "do_sample": false}'))
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 3
    form, form_status = _split(_curl(server, "-d", "text=The oven", "-d", "streaming=false"))  # a real urlencoded form
    assert form_status == 200, form
    assert "outputs" in json.loads(form)


def test_the_multipart_content_type_is_matched_whatever_its_case(http: httpx.Client) -> None:
    boundary = "cakeboundary"
    payload = f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\nHello\r\n'
    payload += f'--{boundary}\r\nContent-Disposition: form-data; name="streaming"\r\n\r\nfalse\r\n--{boundary}--\r\n'
    headers = {"content-type": f"Multipart/Form-Data; boundary={boundary}"}
    response = http.post("/generate", content=payload.encode(), headers=headers)
    assert response.status_code == 200, response.text
    assert "outputs" in response.json()


@needs_curl
def test_multipart_media_for_a_text_model_is_400_naming_the_modality(server: ServerHandle, tmp_path: Path) -> None:
    picture = tmp_path / "cat.jpg"
    picture.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    body, status = _split(_curl(server, "-F", "text=What is in this image?", "-F", f"files=@{picture}"))
    assert status == 400
    assert "image input 'cat.jpg'" in json.loads(body)["detail"]
    body, status = _split(_curl(server, "-F", "text=hello there", "-F", "output_modalities=audio"))
    assert status == 400
    assert "output modality 'audio'" in json.loads(body)["detail"]
    body, status = _split(_curl(server, "-F", "text=hi", "-F", 'model_kwargs={"voice": "tara"}'))
    assert status == 400
    assert "'voice'" in json.loads(body)["detail"]
    body, status = _split(_curl(server, "-F", "text=hi", "-F", "model_kwargs=[1]"))
    assert status == 400
    assert "JSON object" in json.loads(body)["detail"]


def test_multipart_through_httpx_and_a_missing_text(http: httpx.Client) -> None:
    files = {"text": (None, ""), "streaming": (None, "false")}
    missing = http.post("/generate", files=files)
    assert missing.status_code == 400
    assert "text must be a non-empty prompt" in missing.json()["detail"]


def test_a_surrogate_however_the_json_body_carries_it_is_a_400(http: httpx.Client) -> None:
    """Python's JSON reader decodes bytes with "surrogatepass" and guesses UTF-16/32: a lone surrogate encoded in
    UTF-8 bytes (not valid UTF-8), or escaped in a UTF-16 body (which the check for escapes, on the bytes, missed),
    reached the tokenizer as a 500."""
    headers = {"content-type": "application/json"}
    fields = (("/generate", '"prompt": "{}"'), ("/chat", '"messages": [{{"role": "user", "content": "{}"}}]'))
    for path, field in fields:
        encoded = http.post(path, content=("{" + field.format("\udc80") + "}").encode("utf-8", "surrogatepass"))
        assert encoded.status_code == 400 and "not valid JSON" in encoded.json()["detail"], encoded.text
        escaped = http.post(path, content=("{" + field.format("\\ud800") + "}").encode("utf-16"), headers=headers)
        assert escaped.status_code == 400 and "lone UTF-16 surrogate" in escaped.json()["detail"], escaped.text
    whole = http.post("/generate", content='{"prompt": "\\ud83c\\udf82", "max_length": 2}'.encode("utf-16"))
    assert whole.status_code == 200, whole.text  # UTF-16 JSON is still read; a whole pair is one character


def test_a_lone_surrogate_in_model_kwargs_is_a_400_not_a_tokenizer_crash(http: httpx.Client) -> None:
    """The JSON body's check for half a UTF-16 pair did not cover model_kwargs: a `system` holding one reached the
    tokenizer, whose TypeError was a 500 with a traceback in the log."""
    for kwargs in ('{"system": "\\ud800"}', '{"stop": ["\\udfff"]}'):
        form = {"text": (None, "hi"), "streaming": (None, "false"), "model_kwargs": (None, kwargs)}
        refused = http.post("/generate", files=form)
        assert refused.status_code == 400, refused.text
        assert "model_kwargs holds a lone UTF-16 surrogate" in refused.json()["detail"]
    cake = '{"system": "\\ud83c\\udf82", "max_output_tokens": 2}'  # a whole pair is one character: served
    assert http.post("/generate", files={**form, "model_kwargs": (None, cake)}).status_code == 200


def test_a_system_prompt_without_the_chat_template_is_a_400_not_dropped(http: httpx.Client) -> None:
    """With chat_template false the text goes to the model as is: a `system` given with it was left out without a
    word, and the answer looked like one that had followed it."""
    kwargs = {"system": "Answer in French.", "chat_template": False, "max_output_tokens": 2}
    form = {"text": (None, "hi"), "streaming": (None, "false"), "model_kwargs": (None, json.dumps(kwargs))}
    refused = http.post("/generate", files=form)
    assert refused.status_code == 400, refused.text
    assert "model_kwargs.system needs the chat template" in refused.json()["detail"]
    for allowed in ({**kwargs, "chat_template": True}, {**kwargs, "system": ""}):
        form["model_kwargs"] = (None, json.dumps(allowed))
        assert http.post("/generate", files=form).status_code == 200


def test_a_request_id_is_echoed_up_to_its_bound(http: httpx.Client) -> None:
    """The id goes out on every line of a stream: a 7 MB one made each token a 7 MB line (224 MB for 60 tokens)."""
    form = {"text": (None, "hi"), "streaming": (None, "false"), "model_kwargs": (None, '{"max_output_tokens": 2}')}
    kept = http.post("/generate", files={**form, "request_id": (None, "r" * 256)})
    assert kept.status_code == 200 and kept.json()["request_id"] == "r" * 256
    refused = http.post("/generate", files={**form, "request_id": (None, "r" * 257)})
    assert refused.status_code == 400
    assert refused.json() == {"detail": "request_id has 257 characters; at most 256 are allowed"}


def test_modalities_are_read_whatever_their_case_auto_included(http: httpx.Client) -> None:
    """TEXT was read as text but AUTO was an unknown modality: only the names were lowered, not the default."""
    form = {"text": (None, "hi"), "streaming": (None, "false"), "model_kwargs": (None, '{"max_output_tokens": 2}')}
    for given in ("AUTO", " Auto ", "TEXT"):
        answer = http.post("/generate", files={**form, "input_modalities": (None, given)})
        assert answer.status_code == 200, (given, answer.text)


def test_multipart_streams_unless_told_otherwise(http: httpx.Client) -> None:
    # Seed 000 passes streaming=false to get one JSON document; without the field the answer is an NDJSON stream.
    files = {"text": (None, "Hello"), "model_kwargs": (None, '{"max_output_tokens": 3}')}
    streamed = http.post("/generate", files=files)
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in streamed.text.splitlines() if line.strip()]
    assert lines and lines[-1]["done"] is True
    single = http.post("/generate", files={**files, "streaming": (None, "false")})
    assert single.headers["content-type"].startswith("application/json") and "outputs" in single.json()


def test_bad_native_values_are_named_as_sent_and_briefly(http: httpx.Client) -> None:
    """A 3 MB bad value came back whole in the error; max_length 0 was "max_tokens must be…", a multipart
    max_new_tokens was "max_length must be…"; a bad temperature passed with do_sample false; a batch asked to stream
    answered whole without a word."""
    huge = http.post("/generate/batch", json={"prompts": ["x" * 3_000_000, ""]})
    assert huge.status_code == 400 and len(huge.content) < 2000 and "prompts[1] must be" in huge.json()["detail"]
    long_value = http.post("/generate", json={"prompt": "hi", "temperature": "x" * 3_000_000})
    assert long_value.status_code == 400 and len(long_value.content) < 2000
    assert long_value.json()["detail"].startswith("temperature must be")
    zero = http.post("/generate", json={"prompt": "a", "max_length": 0})
    assert zero.status_code == 400 and zero.json()["detail"] == "max_length must be at least 1, got 0"
    for key, value in (("max_new_tokens", 2.0), ("max_output_tokens", 0)):
        form = {"text": (None, "hi"), "streaming": (None, "false"), "model_kwargs": (None, json.dumps({key: value}))}
        named = http.post("/generate", files=form)
        assert named.status_code == 400 and named.json()["detail"].startswith(f"{key} must be"), named.text
    unused = http.post("/generate", json={"prompt": "a", "temperature": "hot", "do_sample": False, "max_length": 2})
    assert unused.status_code == 400 and "temperature must be a number" in unused.json()["detail"]
    streamed = http.post("/generate/batch", json={"prompts": ["a"], "stream": True})
    assert streamed.status_code == 400 and "stream is not supported" in streamed.json()["detail"]


def test_system_info_describes_master_and_stages(http: httpx.Client) -> None:
    info = http.get("/system/info").json()
    master = info["master"]
    for key in ("hostname", "os", "cpu_count", "ram_total_bytes", "ram_available_bytes", "device", "versions"):
        assert key in master, key
    assert master["versions"]["torch"]
    # The CPU's model (here the device is the CPU), not just its architecture.
    assert master["accelerator"] == master["cpu_model"] and master["cpu_model"] not in ("", "x86_64", "aarch64")
    assert info["stages"][0]["layers"] == [0, 3]
    assert info["stages"][0]["local"] is True
    assert info["workers"] == []
    assert info["model"]["loaded"] is True


def test_metrics_count_requests_tokens_and_stage_latency(http: httpx.Client) -> None:
    http.post("/generate", json={"prompt": "The oven", "max_length": 3})
    text = http.get("/metrics").text
    assert 'cake_http_requests_total{method="POST",route="/generate",status="200"}' in text
    for name in (
        "cake_generated_tokens_total",
        "cake_prompt_tokens_total",
        "cake_time_to_first_token_seconds_count",
        "cake_tokens_per_second",
        "cake_queue_depth",
        'cake_stage_forward_ms{layers="0-2",stage="master"}',
        'cake_stage_round_trip_ms{layers="0-2",stage="master"}',
    ):
        assert name in text, name
    generated = next(line for line in text.splitlines() if line.startswith("cake_generated_tokens_total"))
    assert float(generated.split()[-1]) > 0


@pytest.mark.parametrize(
    ("failure", "status"),
    [(StageError("worker 'gpu-1' stopped answering"), 503), (ModelError("weights of layer 2 are NaN"), 500)],
)
def test_engine_failures_get_honest_statuses(
    http: httpx.Client, server: ServerHandle, monkeypatch: pytest.MonkeyPatch, failure: Exception, status: int
) -> None:
    assert server.state.engine is not None
    stage = server.state.engine.pipeline.stages[0]

    def broken(*args: object, **kwargs: object) -> object:
        raise failure

    monkeypatch.setattr(stage, "forward", broken)
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == status
    assert chat.json() == {"error": str(failure)}
    native = http.post("/generate", json={"prompt": "hi", "max_length": 3})
    assert native.status_code == status
    assert native.json() == {"detail": str(failure)}
    monkeypatch.undo()
    assert http.post("/generate", json={"prompt": "hi", "max_length": 2}).status_code == 200


def test_a_stream_that_fails_ends_with_an_error_event_then_done(
    http: httpx.Client, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.state.engine is not None
    stage = server.state.engine.pipeline.stages[0]

    def broken(*args: object, **kwargs: object) -> object:
        raise StageError("worker 'gpu-1' stopped answering")

    monkeypatch.setattr(stage, "forward", broken)
    for path, body, key in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, "error"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 3}, "error"),
        ("/generate", {"prompt": "hi", "max_length": 3}, "detail"),
    ):
        with http.stream("POST", path, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = _sse_events(response)
        assert events[-1] == "[DONE]", (path, events)
        error = json.loads(events[-2])[key]
        assert "gpu-1" in (error if isinstance(error, str) else error["message"]), (path, events)


def test_health_is_503_when_a_stage_is_down(
    http: httpx.Client, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert http.get("/health").json()["status"] == "healthy"
    assert server.state.engine is not None
    monkeypatch.setattr(server.state.engine.pipeline.stages[0], "healthy", lambda: False)
    down = http.get("/health")
    assert down.status_code == 503
    assert down.json()["status"] == "unhealthy"
    assert down.json()["running"] is False
    assert "master" in down.json()["error"]


def test_a_dead_engine_thread_turns_health_and_requests_503(
    http: httpx.Client, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.state.engine is not None
    monkeypatch.setattr(type(server.state.engine), "died", property(lambda engine: True))
    health = http.get("/health")
    assert health.status_code == 503 and health.json()["running"] is False
    assert "engine thread died" in health.json()["error"]
    refused = http.post("/generate", json={"prompt": "hi", "max_length": 2, "stream": True})
    assert refused.status_code == 503 and "engine thread died" in refused.json()["detail"]
