"""A master's first look at a worker it could not handshake with: gRPC says "Deadline Exceeded" alike for a port
where nothing listens, a paused worker and a TLS mismatch (it retries each until the deadline), so a connection of
our own to the port tells them apart, and a TLS handshake of our own says why a certificate failed."""

from __future__ import annotations

import socket
import ssl

KNOCK_TIMEOUT_S = 2.0  # a failed first handshake's own look at the port: connect, and wait this long for a word
# What an HTTP/2 client sends first (the preface, then an empty SETTINGS frame): a plaintext gRPC server answers with
# its own SETTINGS; a TLS server closes the connection (it is no TLS record); a paused process says nothing.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def knock(address: str) -> str:
    """What a worker's port says to a connection of our own: "refused", "no connection (why)", "silent"
    (connected, no word within KNOCK_TIMEOUT_S), "plaintext" (an HTTP/2 server without TLS answered) or "closed"
    (closed at once, or answered in something else: TLS)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=KNOCK_TIMEOUT_S) as raw:
            raw.sendall(_HTTP2_PREFACE)
            try:
                first = raw.recv(9)
            except TimeoutError:
                return "silent"
            except OSError:
                return "closed"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return f"no connection within {KNOCK_TIMEOUT_S:g} s"
    except (OSError, ValueError) as error:
        return f"no connection ({error})"
    return "plaintext" if len(first) >= 4 and first[3] == 0x04 else "closed"  # a SETTINGS frame's type


def tls_probe(address: str, tls: ssl.SSLContext) -> str:
    """gRPC only says it could not connect: a TLS handshake of our own finds out why the certificate failed."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    refused = (
        " (the worker refused this master's certificate{}: a worker started with --tls-ca wants the master's "
        "--tls-cert/--tls-key, signed by that CA)"
    )
    tls.set_alpn_protocols(["h2"])  # what gRPC offers: without it the worker's gRPC port says nothing
    try:
        with socket.create_connection((host, int(port)), timeout=2.0) as raw:
            with tls.wrap_socket(raw, server_hostname=host) as link:
                # With TLS 1.3 the worker judges our certificate after our side of the handshake is done: its
                # verdict is the first thing read (its HTTP/2 settings when all is well; else an alert, or the
                # connection closed at once).
                return "" if link.recv(1) else refused.format("")
    except ssl.SSLCertVerificationError as error:
        return f" (its certificate: {error.verify_message})"
    except ssl.SSLError as error:
        return refused.format(f" ({error.reason})") if "ALERT" in (error.reason or "") else ""
    except (OSError, ValueError):
        return ""
