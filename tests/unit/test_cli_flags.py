"""`cake` flags checked as they are parsed: --help names each default, and a bad value is one line on stderr and
a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.cli import assert_one_line_error, cake


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


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_a_bad_failover_delay_is_named(value: str) -> None:
    assert_one_line_error(cake("serve", "--failover-after", value), "--failover-after", value)


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_a_bad_max_model_len_is_named(value: str) -> None:
    assert_one_line_error(cake("serve", "--max-model-len", value), "--max-model-len", value)


def test_a_rate_burst_of_zero_is_refused_not_taken_as_one(capsys: pytest.CaptureFixture[str]) -> None:
    """--rate-burst 0 (meant as no bursts, or as off like --rate-limit 0) was a burst of 1, silently."""
    from cake_py.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--rate-burst", "0"])
    assert exit_.value.code == 2
    assert "--rate-burst: '0' must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "flag"), [("worker", "--cache-dir"), ("serve", "--files-dir")])
def test_an_empty_folder_flag_is_refused(command: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cake_py.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, flag, ""])
    assert f"argument {flag}: '' is no folder" in capsys.readouterr().err


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


def test_the_memory_kept_from_kv_caches_is_given_in_mebibytes_on_both_sides(tmp_path: Path) -> None:
    from cake_py.cli import _serve_settings, _worker_settings, build_parser

    parser = build_parser()
    files = ["--files-dir", str(tmp_path)]
    assert _worker_settings(parser.parse_args(["worker", "--keep-free-mb", "512"])).keep_free_bytes == 512 << 20
    assert _worker_settings(parser.parse_args(["worker"])).keep_free_bytes is None  # kv_pool's default
    assert _serve_settings(parser.parse_args(["serve", *files, "--keep-free-mb", "0"])).keep_free_bytes == 0
    assert _serve_settings(parser.parse_args(["serve", *files])).keep_free_bytes is None
    assert_one_line_error(cake("serve", "--keep-free-mb", "lots"), "--keep-free-mb: 'lots' is not an integer")
