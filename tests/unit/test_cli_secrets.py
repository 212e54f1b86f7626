"""The CLI's secrets and certificates: API keys, the admin key, the cluster key and the TLS files, checked at start
(never an open server or cluster by a typo or an unset variable) and named in one line without the key itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.cli import assert_one_line_error, cake


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


def test_a_set_but_empty_api_key_variable_is_an_error_not_an_open_server() -> None:
    """CAKE_API_KEY=$UNSET started a server with no key, saying nothing."""
    result = cake("serve", "--port", "1", env={**os.environ, "CAKE_API_KEY": ""}, timeout=60)
    assert_one_line_error(result, "--api-key (or CAKE_API_KEY) holds no key")


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


@pytest.mark.parametrize("key", ["café", "caf\udce9", "two words"])
def test_an_admin_key_a_header_cannot_carry_is_refused(key: str) -> None:
    """--admin-key café was never matched (a header arrives as Latin-1), and Latin-1 bytes from the terminal made
    /models/load a 500: held to the API keys' rule, printable ASCII without spaces."""
    from cake_py.cli import _serve_settings, build_parser
    from cake_py.errors import ConfigError

    with pytest.raises(ConfigError, match="--admin-key .* must be printable ASCII without spaces") as caught:
        _serve_settings(build_parser().parse_args(["serve", "--admin-key", key]))
    assert key not in str(caught.value)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_cluster_key_grpc_cannot_carry_is_refused_at_start(command: str) -> None:
    assert_one_line_error(cake(command, "--cluster-key", "geheimer-schlüssel", "--port", "1"), "printable ASCII")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_empty_cluster_key_is_refused_not_an_open_cluster(command: str) -> None:
    """`--cluster-key "$KEY"` with KEY unset used to run with no key at all."""
    assert_one_line_error(cake(command, "--cluster-key", "", "--port", "1"), "--cluster-key", "not empty")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_tls_flags_are_checked_at_start_even_with_no_worker_to_reach(command: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    assert_one_line_error(cake(command, "--tls-cert", missing, "--tls-key", missing, "--port", "1"), missing)
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    assert_one_line_error(cake(command, "--tls-cert", str(cert), "--port", "1"), "--tls-cert and --tls-key")


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
