"""The cluster key crossing a network without TLS is warned about; loopback traffic is not."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from cake_py.errors import ConfigError
from cake_py.rpc.security import check_certificate_dates, warn_if_key_in_plaintext
from tests.fixtures.tls import make_certificates


@pytest.mark.parametrize(
    ("key", "tls", "hosts", "warned"),
    [
        ("secret", False, ["10.0.0.5", "127.0.0.1"], "10.0.0.5"),
        ("secret", False, ["gpu-box-1"], "gpu-box-1"),  # a name may resolve anywhere
        ("secret", False, ["0.0.0.0"], "0.0.0.0"),  # a worker listening on every interface
        ("secret", False, ["[2001:db8::5]"], "[2001:db8::5]"),
        ("secret", False, ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"], None),
        ("secret", True, ["10.0.0.5"], None),
        (None, False, ["10.0.0.5"], None),  # no key: the worker's own "no --cluster-key" warning covers it
    ],
)
def test_a_plaintext_key_is_warned_about_only_off_the_machine(
    key: str | None, tls: bool, hosts: list[str], warned: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cake_py.rpc.security"):
        warn_if_key_in_plaintext(key, tls, hosts, "the master")
    messages = [record.getMessage() for record in caplog.records]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1
        assert f"the master: the cluster key crosses the network to {warned} in plaintext" in messages[0]
        assert "--tls-cert" in messages[0]


def test_an_expired_certificate_is_a_startup_error_and_a_future_one_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired --tls-cert started fine, and every master failed after a 12 s timeout."""
    certificate = make_certificates(tmp_path).server_cert
    check_certificate_dates(certificate)  # valid for 2 days from now
    with pytest.raises(ConfigError, match=r"--tls-cert '.*' expired on .*: issue a new certificate"):
        check_certificate_dates(certificate, now=time.time() + 3 * 86400)
    check_certificate_dates(certificate, now=time.time() - 86400)
    assert "is not valid before" in caplog.text
