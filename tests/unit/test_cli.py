"""The CLI: bad input is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def cake(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cake_py.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_every_command() -> None:
    result = cake("--help")
    assert result.returncode == 0
    for command in ("serve", "worker", "run", "pull", "list", "rm"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("command", "needles"),
    [
        (
            "serve",
            ["--host HOST address the HTTP API listens on (default: 127.0.0.1)", "(default: 8080)", "(default: 16)"],
        ),
        ("worker", ["(default: 0.0.0.0)", "(default: 10128)", "(default: 600)"]),
        ("run", ["(default: 512)", "sampling temperature (0: greedy) (default: 0.0)", "(default: bfloat16)"]),
    ],
)
def test_help_names_each_flags_default(command: str, needles: list[str]) -> None:
    """`cake serve --help` named neither the address and port it listens on nor the dtype (the README's synopsis
    did); a switch has no default to name, and a help that names its own is left as it is."""
    result = cake(command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # as wrapped to no width
    for needle in [
        *needles,
        "--no-cuda-graphs on a GPU, run every decode step eagerly instead of replaying one "
        "sequence's steps as CUDA graphs --",
    ]:
        assert needle in text
    assert not any(f"(default: {value})" in text for value in ("True", "False", "None"))


def test_bad_flag_value() -> None:
    result = cake("serve", "--dtype", "int3")
    assert result.returncode == 2
    assert "int3" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "value", "needle"),
    [("worker", "9999", "9999"), ("serve", "0-x", "'0-x'"), ("serve", "0-4000000000", "4000000000")],
)
def test_bad_cpus(command: str, value: str, needle: str) -> None:
    assert_one_line_error(cake(command, "--cpus", value, "--port", "1"), needle)


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [("serve", "--port", "70000"), ("worker", "--port", "65536"), ("worker", "--data-port", "70001")],
)
def test_a_port_past_65535_is_refused(command: str, flag: str, value: str) -> None:
    # It used to bind the port modulo 65536 (worker) or end in an OverflowError traceback (serve).
    assert_one_line_error(cake(command, flag, value), flag, value, "0-65535")


@pytest.mark.parametrize("content", [b"\xff\xfeworkers: []", b"workers:\n  - name: a\xff\n"], ids=["bom", "byte"])
def test_a_cluster_config_that_is_not_text_is_one_line(tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_bytes(content)
    assert_one_line_error(cake("serve", "--config", str(config)), "cluster.yaml", "not valid YAML")


def test_missing_model_path(tmp_path: Path) -> None:
    assert_one_line_error(cake("run", str(tmp_path / "nope"), "hi"), "nope", "does not exist")


def test_missing_gguf(tmp_path: Path) -> None:
    assert_one_line_error(cake("run", str(tmp_path / "model.gguf"), "hi"), "model.gguf")


def test_bad_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    assert_one_line_error(cake("run", str(bad), "hi"), "bad.gguf")


def test_unknown_architecture(tmp_path: Path, tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNetForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(cake("run", str(folder), "hi"), "FancyNetForCausalLM")


def test_unknown_hub_id_offline(tmp_path: Path) -> None:
    env = {**_base_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(cake("run", "nobody/no-such-model", "hi", env=env), "nobody/no-such-model")


def test_bad_cluster_config(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("workers:\n  - name: a\n    address: nohost\n")
    assert_one_line_error(cake("serve", "--config", str(config)), "nohost")


def test_run_on_a_tiny_model_streams_text(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    result = cake("run", str(tiny_model_factory("llama")), "hello", "--max-tokens", "5", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    drafting = cake(
        "run", str(tiny_model_factory("llama")), "hello", "--max-tokens", "5", "--dtype", "float32",
        "--speculative-tokens", "4",
    )  # fmt: skip
    assert drafting.returncode == 0 and drafting.stdout == result.stdout  # greedy: the same answer


@pytest.mark.parametrize("command", [("rm", "nobody/absent")])
def test_cache_commands_offline(tmp_path: Path, command: tuple[str, ...]) -> None:
    env = {**_base_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(cake(*command, env=env), "nobody/absent")


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("HF_")}


def test_flags_reach_the_settings() -> None:
    from cake_py.cli import _serve_settings, _worker_settings, build_parser

    parser = build_parser()
    serve = _serve_settings(parser.parse_args(["serve", "--workers", "a:1,b:2", "--no-chain", "--cpus", "0-1"]))
    assert (serve.chain, serve.cpus, serve.threads) == (False, (0, 1), 2)
    assert _serve_settings(parser.parse_args(["serve", "--cpus", "3", "--threads", "1"])).threads == 1
    assert _serve_settings(parser.parse_args(["serve"])).chain is True
    worker = _worker_settings(parser.parse_args(["worker", "--cpus", "0,2"]))
    assert (worker.cpus, worker.threads) == ((0, 2), 2)
    assert (serve.cuda_graphs, worker.cuda_graphs) == (True, True)
    assert _serve_settings(parser.parse_args(["serve", "--no-cuda-graphs", "--device", "cuda:1"])).cuda_graphs is False
    worker = _worker_settings(parser.parse_args(["worker", "--no-cuda-graphs", "--device", "cuda:0"]))
    assert (worker.cuda_graphs, worker.device) == (False, "cuda:0")
    assert (serve.pooling, _serve_settings(parser.parse_args(["serve", "--pooling", "mean"])).pooling) == (None, "mean")
    assert _worker_settings(parser.parse_args(["worker", "--cache-max-gb", "2.5"])).cache_max_bytes == 2_500_000_000
    assert _worker_settings(parser.parse_args(["worker"])).cache_max_bytes == 0
    assert _serve_settings(parser.parse_args(["serve", "--files-max-gb", "0.5"])).files_max_bytes == 500_000_000
    assert _serve_settings(parser.parse_args(["serve"])).files_max_bytes == 0
    assert _serve_settings(parser.parse_args(["serve", "--speculative-tokens", "6"])).speculative_tokens == 6
    assert _serve_settings(parser.parse_args(["serve"])).speculative_tokens == 0


def test_api_keys_reach_the_settings(tmp_path: Path) -> None:
    from cake_py.cli import _serve_settings, build_parser

    keys = tmp_path / "keys.txt"
    keys.write_text("bob bob-key\n")
    args = build_parser().parse_args(["serve", "--api-key", "alice-key", "--api-key-file", str(keys)])
    settings = _serve_settings(args)
    assert (settings.api_keys, settings.api_key_names) == (("alice-key", "bob-key"), {"bob-key": "bob"})


def test_an_unreadable_api_key_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(cake("serve", "--api-key-file", str(tmp_path / "nope.txt")), "nope.txt")


@pytest.mark.parametrize("value", ["", " ", ","])
def test_an_api_key_with_no_key_in_it_is_refused_not_an_open_server(value: str) -> None:
    assert_one_line_error(cake("serve", "--api-key", value), "holds no key")


@pytest.mark.parametrize("value", ["", " ", ","])
def test_a_workers_flag_with_no_address_is_refused_not_a_master_serving_alone(value: str) -> None:
    """--workers "" (a variable left unset) started a master with every layer and no workers, saying nothing."""
    assert_one_line_error(cake("serve", "--port", "1", "--workers", value, timeout=60), "lists no HOST:PORT")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_empty_host_is_refused_not_taken_as_every_interface(command: str) -> None:
    """serve --host "" (a variable left unset) listened on 0.0.0.0 and ::, an open API on every interface where
    the default is loopback; a worker's was gRPC's two-line bind error."""
    result = cake(command, "--host", "", "--port", "1", timeout=60)
    assert_one_line_error(result, "argument --host: '' is no address")


def test_a_kv_idle_time_of_zero_is_refused_not_taken_as_one_second() -> None:
    assert_one_line_error(cake("worker", "--kv-idle-seconds", "0"), "--kv-idle-seconds: '0' must be at least 1")


def test_an_unknown_pooling_is_refused() -> None:
    assert_one_line_error(cake("serve", "--pooling", "cls"), "'cls'")


@pytest.mark.parametrize(
    ("command", "flag", "value", "needle"),
    [
        ("worker", "--name", "", "is no name"),
        ("worker", "--name", "a\nb", "control character"),
        ("serve", "--model-name", " ", "is no name"),
        ("serve", "--model-name", "tiny\n2026-11-23 INFO forged", "control character"),
    ],
)
def test_a_name_that_is_empty_or_holds_a_line_break_is_refused(
    command: str, flag: str, value: str, needle: str
) -> None:
    """--name "" fell back to hostname:port silently; a --model-name with a line break went into the logs as is."""
    assert_one_line_error(cake(command, flag, value), flag, needle)


def test_a_bad_cache_limit_is_refused() -> None:
    assert_one_line_error(cake("worker", "--cache-max-gb", "-1"), "'-1'")
    assert_one_line_error(cake("serve", "--files-max-gb", "lots"), "'lots'")


def test_a_bad_allowed_origin_is_refused() -> None:
    assert_one_line_error(cake("serve", "--allowed-origins", "*,ftp://x"), "'ftp://x'")


@pytest.mark.parametrize("command", ["serve", "worker", "run"])
@pytest.mark.parametrize("device", ["cuda:x", "gpu", "cuda:-1"])
def test_a_device_that_is_no_device_is_refused(command: str, device: str) -> None:
    assert_one_line_error(cake(command, *(["hello"] if command == "run" else []), "--device", device), repr(device))


def test_a_gpu_index_past_the_last_gpu_is_refused() -> None:
    from cake_py.errors import ConfigError
    from cake_py.models.device import resolve_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"--device cuda:{count} .* torch sees {count} CUDA device"):
        resolve_device(f"cuda:{count}")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_cluster_key_grpc_cannot_carry_is_refused_at_start(command: str) -> None:
    assert_one_line_error(cake(command, "--cluster-key", "geheimer-schlüssel", "--port", "1"), "printable ASCII")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_tls_flags_are_checked_at_start_even_with_no_worker_to_reach(command: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    assert_one_line_error(cake(command, "--tls-cert", missing, "--tls-key", missing, "--port", "1"), missing)
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    assert_one_line_error(cake(command, "--tls-cert", str(cert), "--port", "1"), "--tls-cert and --tls-key")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_empty_cluster_key_is_refused_not_an_open_cluster(command: str) -> None:
    """`--cluster-key "$KEY"` with KEY unset used to run with no key at all."""
    assert_one_line_error(cake(command, "--cluster-key", "", "--port", "1"), "--cluster-key", "not empty")


def test_tls_files_that_are_not_pem_name_the_flags(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(bytes(range(256)))
    flags = ("--tls-cert", str(junk), "--tls-key", str(junk), "--port", "0", "--data-port", "0")
    assert_one_line_error(cake("worker", *flags, timeout=60), "--tls-cert", "junk.pem", "not a PEM certificate")
    serve = ("--tls-cert", str(junk), "--tls-key", str(junk), "--port", "0")  # a master with no workers too
    assert_one_line_error(cake("serve", *serve, timeout=60), "--tls-cert", "junk.pem", "not a PEM certificate")
    from cake_py.errors import ConfigError
    from cake_py.rpc.dataplane_client import client_tls

    with pytest.raises(ConfigError, match="--tls-ca .*junk.pem.* is not a PEM CA bundle"):
        client_tls(None, None, junk)


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_a_bad_failover_delay_is_named(value: str) -> None:
    assert_one_line_error(cake("serve", "--failover-after", value), "--failover-after", value)


def test_failover_after_reaches_the_settings() -> None:
    from cake_py.cli import _serve_settings, build_parser

    args = build_parser().parse_args(["serve", "--workers", "127.0.0.1:1", "--failover-after", "2.5"])
    assert _serve_settings(args).failover_after == 2.5
    assert _serve_settings(build_parser().parse_args(["serve"])).failover_after == 0.0


def test_chat_template_and_max_model_len_reach_the_settings(tmp_path: Path) -> None:
    from cake_py.cli import _serve_settings, build_parser

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}", encoding="utf-8")
    parser = build_parser()
    settings = _serve_settings(parser.parse_args(["serve", "--chat-template", str(template), "--max-model-len", "512"]))
    assert (settings.chat_template, settings.max_model_len) == (template.read_text(), 512)
    inline = "{{ messages[0].content }}"
    settings = _serve_settings(parser.parse_args(["serve", "--chat-template", inline, "--ctx-size", "64"]))
    assert (settings.chat_template, settings.max_model_len) == (inline, 64)
    settings = _serve_settings(parser.parse_args(["serve"]))
    assert (settings.chat_template, settings.max_model_len) == (None, None)
    assert not settings.trust_request_chat_template
    assert _serve_settings(parser.parse_args(["serve", "--trust-request-chat-template"])).trust_request_chat_template


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_a_bad_max_model_len_is_named(value: str) -> None:
    assert_one_line_error(cake("serve", "--max-model-len", value), "--max-model-len", value)


def test_a_chat_template_that_is_no_file_and_no_template_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.jinja")
    assert_one_line_error(cake("serve", "--chat-template", missing), "--chat-template", "missing.jinja")


def test_a_max_model_len_past_the_models_context_is_one_line(tiny_llama: Path) -> None:
    # The tiny Llama's context is 512 positions (tests/fixtures/tiny_models.py).
    result = cake("serve", str(tiny_llama), "--device", "cpu", "--max-model-len", "100000", timeout=60)
    assert_one_line_error(result, "--max-model-len 100000", "context", "512 tokens")


def test_a_chat_template_that_does_not_compile_names_its_line(tiny_llama: Path) -> None:
    result = cake("serve", str(tiny_llama), "--device", "cpu", "--chat-template", "{{ ok }}\n{% if %}", timeout=60)
    assert_one_line_error(result, "chat template does not compile", "line 2")


def test_run_renders_with_the_chat_template_given(tiny_llama: Path) -> None:
    from cake_py.engine.oneshot import run_prompt
    from cake_py.models.hub import resolve_model
    from cake_py.models.sampling import SamplingParams

    model = tiny_llama
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokenizer = resolve_model(str(model)).tokenizer
    expected = run_prompt(str(model), "[user] hi\n", params, lambda _: None, dtype="float32", device="cpu", raw=True)
    given = run_prompt(
        str(model), "hi", params, lambda _: None, dtype="float32", device="cpu",
        chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    )  # fmt: skip
    assert given == expected
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) != "[user] hi\n"  # its own is another


def test_settings_files_that_are_no_small_regular_file_are_named(tmp_path: Path) -> None:
    """/dev/zero as a chat template or cluster.yaml was read until memory ran out."""
    assert_one_line_error(cake("run", "hi", "--chat-template", "/dev/zero"), "'/dev/zero' is not a regular file")
    assert_one_line_error(cake("serve", "--config", "/dev/zero"), "--config '/dev/zero' is not a regular file")
    big = tmp_path / "template.jinja"
    big.write_text("{{ messages }}" * 100_000)
    too_big = cake("run", "hi", "--chat-template", str(big))
    assert_one_line_error(too_big, "1400000 bytes, more than 1048576 for a settings file")
    result = cake("serve", "--api-key-file", "/dev/zero", timeout=60)
    assert_one_line_error(result, "--api-key-file '/dev/zero' is not a regular file")


def test_a_set_but_empty_api_key_variable_is_an_error_not_an_open_server() -> None:
    """CAKE_API_KEY=$UNSET started a server with no key, saying nothing."""
    result = cake("serve", "--port", "1", env={**os.environ, "CAKE_API_KEY": ""}, timeout=60)
    assert_one_line_error(result, "--api-key (or CAKE_API_KEY) holds no key")


def test_cake_run_output_problems_and_a_prompt_that_is_not_utf8(tiny_llama: Path) -> None:
    """Each was a traceback: a prompt of bytes that are not UTF-8, a pipe closed early, a full disk."""
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    not_utf8 = subprocess.run(
        [sys.executable, "-m", "cake_py.cli", "run", str(tiny_llama), os.fsdecode(b"ab\xffcd")],
        capture_output=True, text=True, timeout=120, env=environment,
    )  # fmt: skip
    assert_one_line_error(not_utf8, "the prompt is not valid UTF-8 (at character 2)")
    with open("/dev/full", "w") as full:
        disk_full = subprocess.run(
            [sys.executable, "-m", "cake_py.cli", "run", str(tiny_llama), "hi", "--max-tokens", "4"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env=environment,
        )  # fmt: skip
    assert disk_full.returncode == 1 and "Traceback" not in disk_full.stderr
    assert "cake: error: cannot write the output: No space left on device" in disk_full.stderr
    reader = subprocess.Popen(
        [sys.executable, "-m", "cake_py.cli", "run", str(tiny_llama), "hi", "--max-tokens", "200", "--raw"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment,
    )  # fmt: skip
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(1)
    reader.stdout.close()  # as `| head -c 1` does
    assert reader.wait(timeout=120) == 141
    assert b"Traceback" not in reader.stderr.read()
    reader.stderr.close()
    assert_one_line_error(cake("run", str(tiny_llama), "hi", "--max-tokens", "0"), "'0' must be at least 1")


def test_serve_on_port_0_says_the_port_it_got(tiny_llama: Path, tmp_path: Path) -> None:
    """`--port 0` (the OS picks a free port) logged "serving … on http://127.0.0.1:0"."""
    import re
    import time

    import httpx

    from tests.fixtures.cluster import CakeProcess

    args = ["serve", str(tiny_llama), "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--threads", "1"]
    server = CakeProcess("serve", [*args, "--dtype", "float32", "--files-dir", str(tmp_path / "files")], tmp_path)
    server.launch()
    try:
        deadline = time.monotonic() + 120
        while not (said := re.search(r"serving llama on http://127\.0\.0\.1:(\d+)", server.stderr)):
            assert server.running and time.monotonic() < deadline, server.stderr[-2000:]
            time.sleep(0.1)
        port = int(said.group(1))
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        # uvicorn's access lines join cake's own on stderr, timestamped (they went to stdout without a time).
        deadline = time.monotonic() + 10
        while '"GET /health HTTP/1.1" 200' not in server.stderr and time.monotonic() < deadline:
            time.sleep(0.1)
        line = next(line for line in server.stderr.splitlines() if '"GET /health HTTP/1.1" 200' in line)
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line), line
        assert server.stdout == ""
    finally:
        server.kill()


def test_serve_with_stdout_closed_serves_and_run_writes_what_the_terminal_cannot_encode(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """`cake serve >&-` failed once the model was loaded (uvicorn's log config read the closed stdout); `cake run`
    on a terminal whose encoding lacks a character of the answer was a UnicodeEncodeError traceback."""
    import re
    import time

    import httpx

    log = tmp_path / "serve.log"
    command = f'exec "$0" -m cake_py.cli serve {tiny_llama} --port 0 --threads 1 --files-dir {tmp_path} >&-'
    with log.open("w") as sink:
        server = subprocess.Popen(["bash", "-c", command, sys.executable], stderr=sink, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (said := re.search(r"serving llama on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{said.group(1)}/health", timeout=10).status_code == 200
    finally:
        server.kill()
        server.wait()
    environment = {**os.environ, "PYTHONIOENCODING": "ascii"}
    ascii_only = cake("run", str(tiny_llama), "Ünïcödé ☕", "--max-tokens", "24", "--raw", env=environment)
    assert ascii_only.returncode == 0 and "Traceback" not in ascii_only.stderr, ascii_only.stderr


def test_the_admin_key_is_an_api_key_too_and_an_empty_one_is_refused() -> None:
    from cake_py.cli import _serve_settings, build_parser

    parser = build_parser()
    settings = _serve_settings(parser.parse_args(["serve", "--api-key", "a,b", "--admin-key", "root"]))
    assert settings.admin_key == "root" and settings.api_keys == ("a", "b", "root")
    assert settings.api_key_names["root"] == "admin"
    open_api = _serve_settings(parser.parse_args(["serve", "--admin-key", "root"]))
    assert open_api.api_keys == () and open_api.admin_key == "root"  # the API stays open; its models are guarded
    result = cake("serve", "--port", "1", env={**os.environ, "CAKE_ADMIN_KEY": " "}, timeout=60)
    assert_one_line_error(result, "--admin-key (or CAKE_ADMIN_KEY) holds no key")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["serve", ""], "MODEL '' names no model"),
        (["serve", "--model-path", " "], "--model-path ' ' names no model"),
        (["serve", "org/model", "--model-path", ""], "--model-path '' names no model"),
    ],
)
def test_an_empty_model_is_refused_not_the_embedded_default(args: list[str], needle: str) -> None:
    """`cake serve "$MODEL"` with the variable unset served the embedded default, saying nothing."""
    from cake_py.cli import _serve_settings, build_parser
    from cake_py.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        _serve_settings(build_parser().parse_args(args))


def test_run_with_an_empty_model_is_refused_not_the_embedded_default() -> None:
    assert_one_line_error(cake("run", "", "hi", "--max-tokens", "1"), "MODEL '' names no model")


def test_run_with_a_model_and_no_prompt_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    """`cake run ./model` (ollama's `ollama run MODEL`) sent the path as the prompt to the embedded default."""
    assert_one_line_error(cake("run", str(tiny_llama), "--max-tokens", "1"), "is a model and no prompt")
    gguf = tmp_path / "m.GGUF"
    gguf.write_bytes(b"")
    assert_one_line_error(cake("run", str(gguf), "--max-tokens", "1"), "is a model and no prompt")


def test_no_home_folder_is_named_where_a_default_folder_is_needed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no HOME and no passwd entry (a container run as an unknown uid), Path.home() raised while the parser's
    help was built: a traceback for every command, --help and cake run included."""
    import pwd

    from cake_py.cli import _serve_settings, _worker_settings, build_parser
    from cake_py.errors import ConfigError

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    for variable in ("HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--help"])
    assert "set HOME or XDG_CACHE_HOME" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ConfigError, match="no home folder to keep files in: set HOME or XDG_CACHE_HOME"):
        _worker_settings(parser.parse_args(["worker"]))
    with pytest.raises(ConfigError, match="set HOME or XDG_DATA_HOME"):
        _serve_settings(parser.parse_args(["serve"]))
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/cache")
    assert _worker_settings(parser.parse_args(["worker"])).cache_dir == Path("/tmp/cache/cake/worker")


def test_a_rate_burst_of_zero_is_refused_not_taken_as_one(capsys: pytest.CaptureFixture[str]) -> None:
    """--rate-burst 0 (meant as no bursts, or as off like --rate-limit 0) was a burst of 1, silently."""
    from cake_py.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--rate-burst", "0"])
    assert exit_.value.code == 2
    assert "--rate-burst: '0' must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["café", "caf\udce9", "two words"])
def test_an_admin_key_a_header_cannot_carry_is_refused(key: str) -> None:
    """--admin-key café was never matched (a header arrives as Latin-1), and Latin-1 bytes from the terminal made
    /models/load a 500: held to the API keys' rule, printable ASCII without spaces."""
    from cake_py.cli import _serve_settings, build_parser
    from cake_py.errors import ConfigError

    with pytest.raises(ConfigError, match="--admin-key .* must be printable ASCII without spaces") as caught:
        _serve_settings(build_parser().parse_args(["serve", "--admin-key", key]))
    assert key not in str(caught.value)


@pytest.mark.parametrize(("command", "flag"), [("worker", "--cache-dir"), ("serve", "--files-dir")])
def test_an_empty_folder_flag_is_refused(command: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cake_py.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, flag, ""])
    assert f"argument {flag}: '' is no folder" in capsys.readouterr().err


def test_run_takes_a_thread_count_and_a_log_level_in_any_case(tiny_llama: Path) -> None:
    """`cake run` had no --threads (as serve and worker have, and llama.cpp's -t): only OMP_NUM_THREADS bounded it;
    --log-level INFO was refused; --raw ignored --chat-template without a word."""
    ran = cake("run", str(tiny_llama), "hi", "--threads", "1", "--max-tokens", "2", "--dtype", "float32")
    assert ran.returncode == 0, ran.stderr
    assert_one_line_error(cake("run", "hi", "--threads", "0"), "--threads")
    assert_one_line_error(cake("run", "hi", "--raw", "--chat-template", "{{ x }}"), "--raw sends PROMPT without")
    from cake_py.cli_parser import build_parser
    from cake_py.engine.oneshot import run_prompt
    from cake_py.models.sampling import SamplingParams

    before = torch.get_num_threads()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1)
        run_prompt(str(tiny_llama), "hi", params, lambda _: None, dtype="float32", device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

    assert build_parser().parse_args(["worker", "--log-level", "INFO"]).log_level == "info"
    assert build_parser().parse_args(["run", "hi", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["run", "hi", "--seed", "-1"]).seed is None  # random, as llama.cpp's -s -1
    assert build_parser().parse_args(["run", "hi", "--seed", "-2"]).seed == -2


def test_run_reads_the_prompt_from_stdin_when_it_is_a_dash(tiny_llama: Path) -> None:
    """`cat question.txt | cake run MODEL -`: a long or multi-line prompt had to fit in one shell argument."""
    command = [sys.executable, "-m", "cake_py.cli", "run", str(tiny_llama)]
    flags = ["--max-tokens", "4", "--dtype", "float32", "--raw"]
    given = subprocess.run([*command, "hello\nthere", *flags], capture_output=True, text=True, timeout=120)
    piped = subprocess.run([*command, "-", *flags], input="hello\nthere", capture_output=True, text=True, timeout=120)
    assert given.returncode == 0 and piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout
    not_utf8 = subprocess.run([*command, "-", *flags], input=b"caf\xe9", capture_output=True, timeout=120)
    assert not_utf8.returncode == 1
    assert not_utf8.stderr.decode() == "cake: error: the prompt on stdin is not valid UTF-8 (at byte 3)\n"
    closed = subprocess.run([*command, "-", *flags], stdin=None, capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: os.close(0))  # fmt: skip
    assert_one_line_error(closed, "stdin is closed")
