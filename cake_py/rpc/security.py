"""Cluster key and TLS between master and workers.

Every call carries the cluster key in metadata; one server interceptor checks it with a constant-time compare and
answers UNAUTHENTICATED otherwise. TLS (optional) uses PEM files; with a CA given, both sides verify each other.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from cake_py.errors import ConfigError

KEY_HEADER = "x-cake-cluster-key"

log = logging.getLogger(__name__)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {error.strerror}") from error


class ClusterKeyInterceptor(grpc.ServerInterceptor):
    """Rejects any call whose cluster key differs from the worker's (when the worker has one)."""

    def __init__(self, key: str | None) -> None:
        self.key = key.encode() if key else None

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        if self.key is None:
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get(KEY_HEADER, "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self.key):
            return continuation(handler_call_details)
        return _deny(handler_call_details.method or "", "a wrong" if given_bytes else "no")


def _deny(method: str, given: str) -> grpc.RpcMethodHandler:
    message = "cluster key rejected: the master's --cluster-key does not match this worker's"

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        log.warning("refused %s from %s: it gave %s cluster key (see --cluster-key)", method, context.peer(), given)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if method.endswith("/Forward"):
        return grpc.stream_stream_rpc_method_handler(abort)
    if method.endswith("/Assign"):
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def warn_if_key_in_plaintext(key: str | None, tls: bool, hosts: Iterable[str], who: str) -> None:
    """The cluster key travels as-is in every call: without TLS, anyone who can read the traffic between two
    machines can reuse it. Loopback traffic never leaves the machine, so it is not warned about."""
    exposed = [host for host in hosts if not _is_loopback(host)]
    if key and not tls and exposed:
        log.warning(
            "%s: the cluster key crosses the network to %s in plaintext (no TLS); anyone who can read that traffic "
            "can reuse it: add --tls-cert/--tls-key (and --tls-ca) on master and workers",
            who,
            ", ".join(exposed),
        )


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


def key_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return ((KEY_HEADER, key),) if key else ()


def check_certificate_dates(path: Path, now: float | None = None) -> None:
    """ConfigError for an expired --tls-cert (every peer would refuse it, each after a timeout, while this side
    said nothing); a warning for one not valid yet (a clock a little behind may still catch up)."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]  # the stdlib's PEM reader
        not_before, not_after = (ssl.cert_time_to_seconds(decoded[name]) for name in ("notBefore", "notAfter"))
    except (ssl.SSLError, OSError, ValueError, KeyError):
        return  # not readable as one certificate: loading it says why
    now = time.time() if now is None else now
    if now > not_after:
        raise ConfigError(f"--tls-cert {str(path)!r} expired on {decoded['notAfter']}: issue a new certificate")
    if now < not_before:
        log.warning("--tls-cert %s is not valid before %s: peers refuse it until then", path, decoded["notBefore"])


def server_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ServerCredentials | None:
    """TLS credentials for a worker, or None for plaintext. With a CA, masters must present a certificate."""
    if cert is None and key is None:
        if ca is not None:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key on the worker")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    cert_bytes, key_bytes = _read(cert, "TLS certificate"), _read(key, "TLS key")
    assert cert_bytes is not None and key_bytes is not None
    check_certificate_dates(cert)
    ca_bytes = _read(ca, "TLS CA")
    return grpc.ssl_server_credentials(
        [(key_bytes, cert_bytes)], root_certificates=ca_bytes, require_client_auth=ca_bytes is not None
    )


def channel_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ChannelCredentials | None:
    """TLS credentials for the master's channels, or None for plaintext."""
    if cert is None and key is None and ca is None:
        return None
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
    if cert is not None:
        check_certificate_dates(cert)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA"),
        private_key=_read(key, "TLS key"),
        certificate_chain=_read(cert, "TLS certificate"),
    )
