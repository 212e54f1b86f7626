"""What `cake serve` and `cake worker` are given (flags, MODEL, cluster.yaml, settings files) as the settings they
run with, and each bad one named in one line before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import assert_one_line_error, cake


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
    assert _serve_settings(parser.parse_args(["serve"])).micro_batch_tokens is None
    assert _serve_settings(parser.parse_args(["serve", "--micro-batch-tokens", "0"])).micro_batch_tokens == 0


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


def test_a_chat_template_that_is_no_file_and_no_template_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.jinja")
    assert_one_line_error(cake("serve", "--chat-template", missing), "--chat-template", "missing.jinja")


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


@pytest.mark.parametrize("value", ["", " ", ","])
def test_a_workers_flag_with_no_address_is_refused_not_a_master_serving_alone(value: str) -> None:
    """--workers "" (a variable left unset) started a master with every layer and no workers, saying nothing."""
    assert_one_line_error(cake("serve", "--port", "1", "--workers", value, timeout=60), "lists no HOST:PORT")


@pytest.mark.parametrize("content", [b"\xff\xfeworkers: []", b"workers:\n  - name: a\xff\n"], ids=["bom", "byte"])
def test_a_cluster_config_that_is_not_text_is_one_line(tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_bytes(content)
    assert_one_line_error(cake("serve", "--config", str(config)), "cluster.yaml", "not valid YAML")


def test_bad_cluster_config(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("workers:\n  - name: a\n    address: nohost\n")
    assert_one_line_error(cake("serve", "--config", str(config)), "nohost")


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


def test_bad_settings_are_refused_before_torch_is_imported() -> None:
    """serve, worker and run imported what runs them (torch: 3 s and more) before they read their flags and
    settings files, so a bad one was answered only seconds later."""
    code = (
        "import sys\nfrom cake_py.cli import main\n"
        "commands = [['serve', '--config', '/dev/zero'], ['worker', '--cpus', '9999'],"
        " ['run', 'hi', '--chat-template', '/dev/zero'], ['run', 'hi', '--device', 'gpu']]\n"
        "codes = [main(command) for command in commands]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[1, 1, 1, 1] False", result.stderr  # each refused, and no torch
    assert result.stderr.count("cake: error: ") == 4, result.stderr


def test_the_cluster_files_model_is_found_beside_it_and_a_model_argument_from_here(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model: ./llama` in deploy/cluster.yaml is deploy/llama whatever the working directory; a MODEL on the
    command line is read from the working directory, as any argument is, and overrides the file's."""
    from cake_py.cli import _serve_settings, build_parser
    from cake_py.models.hub import resolve_model

    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "llama").symlink_to(tiny_llama)
    (deploy / "cluster.yaml").write_text("model: ./llama\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    parser = build_parser()
    settings = _serve_settings(parser.parse_args(["serve", "--config", "../deploy/cluster.yaml"]))
    assert settings.model == str(deploy.resolve() / "llama")
    assert resolve_model(settings.model).model_id == "llama"
    (elsewhere / "mine").symlink_to(tiny_llama)
    given = _serve_settings(parser.parse_args(["serve", "./mine", "--config", "../deploy/cluster.yaml"]))
    assert given.model == "./mine"
    assert resolve_model(given.model).model_id == "mine"
