"""Every file in examples/ does what it says: the Python examples and curl scripts run against a live server on a
tiny model (their base URL comes from CAKE_BASE_URL, as a user's would), and the cluster files parse and place."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cake_py.cluster.placement import check_manual
from cake_py.config import load_cluster_file
from tests.fixtures.server import ServerHandle, running_server, slow_steps, tiny_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
CURL_SCRIPTS = EXAMPLES / "curl"
SMOLLM2_LAYERS = 30  # SmolLM2-135M-Instruct, the model both cluster files name
RUN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama)) as handle:
        yield handle


@pytest.fixture(scope="module")
def long_context_server(tiny_llama_long_context: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama_long_context)) as handle:
        yield handle


def _run(command: list[str], server: ServerHandle, *args: str, env: dict[str, str] | None = None) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("CAKE_API_KEY", "CAKE_UI_AUTH")}
    environment |= {"CAKE_BASE_URL": server.base_url, "CAKE_MAX_TOKENS": "8", "PYTHONPATH": str(REPO_ROOT)}
    environment |= env or {}
    result = subprocess.run(
        [*command, *args], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _curl(script: str, server: ServerHandle) -> str:
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.fail("the curl examples need curl and bash on PATH (apt-get install curl)")
    return _run(["bash", str(CURL_SCRIPTS / script)], server)


def _json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def _sse(output: str) -> list[str]:
    return [line.removeprefix("data: ") for line in output.splitlines() if line.startswith("data: ")]


def test_openai_chat_example(server: ServerHandle) -> None:
    output = _run([sys.executable, str(EXAMPLES / "openai_chat.py")], server, "Name a cake.")
    lines = output.splitlines()
    assert lines[0] == "model: llama"
    assert any(line.startswith("blocking: ") for line in lines)
    # Random weights sample the end token now and then: "stop" before CAKE_MAX_TOKENS=8 is as right as "length".
    assert re.search(r"^finish_reason: (stop|length), prompt_tokens: \d+, completion_tokens: [1-8]$", output, re.M)
    assert any(line.startswith("streaming: ") for line in lines)
    assert re.fullmatch(r"finish_reason: (stop|length), completion_tokens: [1-8]", lines[-1])


def test_openai_structured_example(long_context_server: ServerHandle) -> None:
    output = _run([sys.executable, str(EXAMPLES / "openai_structured.py")], long_context_server)
    lines = output.splitlines()
    assert lines[0].startswith("json")  # parsed, or cut by CAKE_MAX_TOKENS=8 on random weights
    assert lines[1] in ("choice: yes", "choice: no")
    call = re.fullmatch(r"tool call: get_weather\((.*)\), finish_reason: tool_calls", lines[2])
    assert call is not None, lines[2]
    assert set(json.loads(call.group(1))) == {"city", "unit"}
    assert lines[3].startswith("answer: ")


def test_openai_responses_example(server: ServerHandle) -> None:
    output = _run([sys.executable, str(EXAMPLES / "openai_responses.py")], server)
    # searched, not read by line number: the tiny model's random text may hold line breaks
    assert re.match(r"first \((completed|incomplete)\): ", output)
    assert re.search(r"^second \((completed|incomplete)\): ", output, re.M)
    turn = re.search(r"^second turn: (\d+) input tokens, (\d+) cached$", output, re.M)
    assert turn is not None and 0 < int(turn.group(2)) < int(turn.group(1))  # the first turn's caches were kept
    counted = re.search(r"^conversation turn: (\d+) input tokens counted, (\d+) used$", output, re.M)
    assert counted is not None and counted.group(1) == counted.group(2)  # the count is what the turn used
    assert re.search(r"^conversation items: user, assistant, user, assistant$", output, re.M)
    assert re.search(r"^streamed: ", output, re.M)
    assert re.search(r"^stream ended: response\.(completed|incomplete)$", output, re.M)
    assert re.search(r"^background \((completed|incomplete)\): ", output, re.M)
    assert re.search(r"^embeddings: 3 of 64 dimensions; nearest to the first: '.*'$", output, re.M)


def test_openai_batch_example(server: ServerHandle) -> None:
    output = _run([sys.executable, str(EXAMPLES / "openai_batch.py")], server, "Name a cake.", "Name a river.")
    lines = output.splitlines()
    assert lines[0].startswith("batch: batch_") and lines[1] == "status: completed, completed: 2, failed: 0"
    # The tiny model's answers may hold line breaks: each answer's first line names its request.
    named = sorted(line.split(":")[0] for line in lines if re.match(r"question-\d: ", line))
    assert named == ["question-0", "question-1"]


def test_anthropic_messages_example(server: ServerHandle) -> None:
    output = _run([sys.executable, str(EXAMPLES / "anthropic_messages.py")], server, "Name a cake.")
    lines = output.splitlines()  # the tiny model's answers may hold line breaks: the figures' lines are found
    assert lines[0].startswith("blocking: ") and any(line.startswith("streaming: ") for line in lines)
    stops = [line for line in lines if re.fullmatch(r"stop_reason: (end_turn|max_tokens), output_tokens: [1-8]", line)]
    assert len(stops) == 2 and re.fullmatch(r"input_tokens: \d+", lines[-1])


def test_sdk_example(server: ServerHandle) -> None:
    output = _run([sys.executable, str(EXAMPLES / "sdk_generate.py")], server)
    assert "health: healthy (model llama)" in output
    assert re.search(r"^finish_reason: (stop|length), usage: \{'prompt_tokens': \d+", output, re.M)
    assert re.search(r"^stream done: (stop|length), request_id: sdk-example$", output, re.M)
    assert "greedy repeatable: True" in output
    assert "topology: llama with 3 layers on master 3 layer(s)" in output
    assert "generate_image: 404 No image model loaded" in output
    assert "tts: 404 No audio model loaded" in output
    assert "bad request: BadRequestError 400" in output


def test_curl_chat(server: ServerHandle) -> None:
    output = _curl("chat.sh", server)
    blocking, alias = _json_lines(output)
    assert blocking["object"] == "chat.completion"
    assert alias["object"] == "chat.completion" and len(alias["choices"]) == 2
    events = _sse(output)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["usage"]["completion_tokens"] <= 32


def test_curl_completions(server: ServerHandle) -> None:
    (body,) = _json_lines(_curl("completions.sh", server))
    assert body["object"] == "text_completion"
    assert body["choices"][0]["logprobs"] is not None


def test_curl_responses(server: ServerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    # The script cancels a 400-token background answer "at once", a curl later: 10 ms a step makes that 4 s, still
    # running when the cancel comes (a fast machine could finish it first, and the cancel was then refused).
    slow_steps(monkeypatch, server, 0.01)
    output = _curl("responses.sh", server)
    first, second, stored, job, polled, cancelled = _json_lines(output)
    assert first["object"] == "response" and second["previous_response_id"] == first["id"]
    assert stored == first
    events = re.findall(r"^event: (\S+)$", output, re.M)
    assert events[:2] == ["response.created", "response.in_progress"]
    assert "[DONE]" not in output
    assert job["status"] == "queued" and job["background"] is True and polled["id"] == job["id"]
    lines = output.splitlines()
    objects = [index for index, line in enumerate(lines) if line.startswith("{")]
    replayed = [json.loads(line) for line in _sse("\n".join(lines[objects[4] :]))]  # printed after the poll
    # it starts after event 2 (created, queued, in_progress are 0-2)
    assert [event["sequence_number"] for event in replayed] == list(range(3, 3 + len(replayed)))
    # it ends as the response did (the replay follows it to its end)
    assert replayed[-1]["type"] in ("response.completed", "response.incomplete")
    assert cancelled["status"] == "cancelled" and cancelled["background"] is True and cancelled["id"] != job["id"]


def test_curl_embeddings(server: ServerHandle) -> None:
    (body,) = _json_lines(_curl("embeddings.sh", server))
    assert [item["index"] for item in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 64


def test_curl_tokenize(server: ServerHandle) -> None:
    by_prompt, by_messages, by_content, text = _json_lines(_curl("tokenize.sh", server))
    assert by_prompt["count"] == len(by_prompt["tokens"]) == len(by_prompt["token_strs"])
    assert by_messages["count"] > by_prompt["count"]
    assert all(set(piece) == {"id", "piece"} for piece in by_content["tokens"])
    assert set(text) == {"prompt", "content"}
    assert text["content"] == "Hello, world!"  # the first call's ids, back to text


def test_curl_models(server: ServerHandle) -> None:
    (body,) = _json_lines(_curl("models.sh", server))
    assert [model["id"] for model in body["data"]] == ["llama"]


def test_curl_native_generate_json_and_sse(server: ServerHandle) -> None:
    output = _curl("generate.sh", server)
    (blocking,) = _json_lines(output)
    assert set(blocking) == {"response", "finish_reason", "usage"}
    events = _sse(output)
    assert events[-1] == "[DONE]" and "finish_reason" in json.loads(events[-2])


def test_curl_native_generate_multipart_and_ndjson(server: ServerHandle) -> None:
    blocking, *stream = _json_lines(_curl("generate_multipart.sh", server))
    assert blocking["request_id"] == "curl-example"
    assert blocking["outputs"]["text"][0]["metadata"]["usage"]["completion_tokens"] <= 64
    assert all(line["modality"] == "text" for line in stream)
    assert stream[-1]["done"] is True and not any(line.get("done") for line in stream[:-1])


def test_curl_batch(server: ServerHandle) -> None:
    (body,) = _json_lines(_curl("batch.sh", server))
    assert len(body["responses"]) == 2


def test_curl_native_chat(server: ServerHandle) -> None:
    (body,) = _json_lines(_curl("native_chat.sh", server))
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_curl_model_management_read_only(server: ServerHandle) -> None:
    current, available = _json_lines(_curl("model_management.sh", server))
    assert current["loaded"] is True and current["model_id"] == "llama"
    assert available["current"] == server.state.settings.model  # the path it was served from: an entry's model_id
    assert available["current"] in [model["model_id"] for model in available["models"]]
    assert server.state.model_name == "llama"  # the script changed nothing


def test_curl_system_info(server: ServerHandle) -> None:
    (body,) = _json_lines(_curl("system_info.sh", server))
    assert "master" in body and "stages" in body


def test_curl_health(server: ServerHandle) -> None:
    (body,) = _json_lines(_curl("health.sh", server))
    assert (body["status"], body["running"]) == ("healthy", True)


def test_curl_metrics(server: ServerHandle) -> None:
    lines = _curl("metrics.sh", server).splitlines()
    assert any(line.startswith("cake_generated_tokens_total ") for line in lines)
    assert all(line.startswith("cake_") for line in lines)


def test_curl_topology(server: ServerHandle) -> None:
    (body,) = _json_lines(_curl("topology.sh", server))
    assert (body["model"], body["num_layers"], body["workers"]) == ("llama", 3, [])


def test_sdk_example_against_a_master_with_ui_auth(tiny_llama: Path) -> None:
    with running_server(tiny_settings(tiny_llama, ui_auth=("admin", "pw"))) as guarded:
        refused = _run([sys.executable, str(EXAMPLES / "sdk_generate.py")], guarded)
        assert re.search(r"^topology: 401 .*CAKE_UI_AUTH", refused, re.M)
        allowed = _run([sys.executable, str(EXAMPLES / "sdk_generate.py")], guarded, env={"CAKE_UI_AUTH": "admin:pw"})
        assert "topology: llama with 3 layers on master 3 layer(s)" in allowed


def test_curl_images_and_audio_say_no_model_is_loaded(server: ServerHandle) -> None:
    output = _curl("images_audio.sh", server)
    assert _json_lines(output) == [{"error": "No image model loaded"}] * 2 + [{"error": "No audio model loaded"}]
    assert output.count("HTTP 404") == 3


def test_examples_say_clearly_when_no_server_answers() -> None:
    environment = dict(os.environ, CAKE_BASE_URL="http://127.0.0.1:9", PYTHONPATH=str(REPO_ROOT))
    for example in (
        "sdk_generate.py",
        "openai_chat.py",
        "openai_responses.py",
        "openai_batch.py",
        "anthropic_messages.py",
    ):
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / example)], env=environment, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1
        assert "Traceback" not in result.stderr and "CAKE_BASE_URL" in result.stderr


def test_every_curl_script_is_tested() -> None:
    tested = {
        "chat.sh",
        "completions.sh",
        "models.sh",
        "generate.sh",
        "generate_multipart.sh",
        "batch.sh",
        "native_chat.sh",
        "model_management.sh",
        "system_info.sh",
        "health.sh",
        "metrics.sh",
        "topology.sh",
        "images_audio.sh",
        "responses.sh",
        "embeddings.sh",
        "tokenize.sh",
    }
    assert {path.name for path in CURL_SCRIPTS.glob("*.sh")} == tested


@pytest.mark.parametrize("path", ["examples/cluster-3-node.yaml", "cluster.yaml"])
def test_cluster_files_parse_and_place_on_smollm2(path: str) -> None:
    cluster = load_cluster_file(REPO_ROOT / path)
    assert cluster.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len({worker.address for worker in cluster.workers}) == len(cluster.workers) == 2
    placed = check_manual({worker.name: worker.layers for worker in cluster.workers}, SMOLLM2_LAYERS)
    assert set(placed) == {worker.name for worker in cluster.workers}


def test_the_3_node_example_leaves_the_last_third_on_the_master() -> None:
    cluster = load_cluster_file(EXAMPLES / "cluster-3-node.yaml")
    assert [(worker.name, worker.layers) for worker in cluster.workers] == [("laptop", (0, 10)), ("desktop", (10, 20))]
