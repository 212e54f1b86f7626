"""Checks of the values `cake serve` and `cake worker` are given (keys, TLS files, origins, the files folder, a chat
template, the listening address): each a ConfigError naming the flag and the bad value, found before anything
starts. cake_py.config holds the settings these fill."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from cake_py.config import read_settings_file
from cake_py.errors import ConfigError


def check_model(value: str | None, where: str) -> str | None:
    """MODEL or --model-path as given: empty (`cake serve "$MODEL"` with the variable unset) is refused, not taken as
    no model: the embedded default was served in its place without a word."""
    if value is not None and not value.strip():
        raise ConfigError(f"{where} {value!r} names no model: leave it out for the embedded default")
    return value


def run_arguments(args: Sequence[str]) -> tuple[str | None, str]:
    """`cake run [MODEL] PROMPT`'s arguments → (MODEL, or None for the embedded default; PROMPT). A lone argument
    naming a local model is refused: it would be the prompt, answered by another model."""
    if len(args) > 2:
        raise ConfigError(f"cake run takes [MODEL] PROMPT, got {len(args)} arguments (quote the prompt)")
    if len(args) == 1:
        if _is_model(args[0]):  # `cake run ./model` (ollama's way): the embedded default answered the path
            raise ConfigError(f"{args[0]!r} is a model and no prompt: cake run MODEL PROMPT (- reads it from stdin)")
        if _names_a_gguf_file(args[0]):  # a mistyped model path: answering it as a prompt would hide the typo
            raise ConfigError(f"{args[0]!r} looks like a .gguf file, but there is none: cake run MODEL PROMPT")
        return None, args[0]
    return check_model(args[0], "MODEL"), args[1]


MAX_STDIN_PROMPT_BYTES = 64 * 1024 * 1024  # far past any model's context; a stream without end is not waited out


def read_prompt(prompt: str, stdin: BinaryIO | None) -> str:
    """`cake run`'s PROMPT: `-` reads it from stdin (`cat question.txt | cake run -`), as UTF-8; the rest as given."""
    if prompt != "-":
        return prompt
    if stdin is None:  # closed (`<&-`)
        raise ConfigError("the prompt is - (read from stdin), but stdin is closed")
    data = stdin.read(MAX_STDIN_PROMPT_BYTES + 1)
    if len(data) > MAX_STDIN_PROMPT_BYTES:
        raise ConfigError(f"the prompt on stdin is over {MAX_STDIN_PROMPT_BYTES // (1024 * 1024)} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"the prompt on stdin is not valid UTF-8 (at byte {error.start})") from None


def _is_model(text: str) -> bool:
    """A local model folder (config.json inside) or .gguf file: what a lone `cake run` argument is not meant to be."""
    path = Path(text)
    try:
        return path.is_dir() and (path / "config.json").is_file() or path.suffix.lower() == ".gguf" and path.is_file()
    except (OSError, ValueError):  # a prompt too long for a file name, or holding a NUL
        return False


def _names_a_gguf_file(text: str) -> bool:
    """One word ending in .gguf: a model file's name, not a prompt, whether or not the file is there."""
    return text.strip().lower().endswith(".gguf") and not any(c.isspace() for c in text.strip())


def parse_origins(value: str) -> tuple[str, ...]:
    """--allowed-origins: `*`, or comma-separated origins such as https://app.example.com ('' allows none)."""
    origins = tuple(origin.strip().rstrip("/") for origin in value.split(",") if origin.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(f"--allowed-origins: {origin!r} is not * or an origin such as https://app.example.com")
    return origins


def parse_api_keys(value: str | None, key_file: Path | None = None) -> tuple[tuple[str, ...], dict[str, str]]:
    """--api-key KEY[,KEY…] (a comma-separated list, as llama.cpp's server takes it) and --api-key-file (one key per
    line, or a name and its key: `alice KEY`; blank lines and # comments skipped): the keys, and the names given. A
    key travels in an HTTP header: printable ASCII without spaces. The messages name where a bad key is, never the
    key."""
    keys = [("--api-key", key.strip()) for key in (value or "").split(",") if key.strip()]
    if value is not None and not keys:  # given, but nothing in it: never a server left open by a typo
        raise ConfigError("--api-key (or CAKE_API_KEY) holds no key: give KEY, or KEY1,KEY2")
    names: dict[str, str] = {}
    if key_file is not None:
        # A small regular file: /dev/zero was read until memory ran out, and a FIFO held startup forever.
        content = read_settings_file(key_file, "--api-key-file")
        try:
            lines = content.decode("utf-8-sig").splitlines()  # a BOM some editors write is not a key
        except UnicodeDecodeError as error:
            raise ConfigError(f"--api-key-file {str(key_file)!r} cannot be read: {error}") from None
        for number, line in enumerate(lines, 1):
            fields = line.split()
            comment = next((at for at, field in enumerate(fields) if field.startswith("#")), len(fields))
            fields = fields[:comment]  # `KEY  # bob's` keeps KEY: a comment is never read as a key
            if not fields:
                continue
            where = f"line {number} of --api-key-file"
            if len(fields) > 2 or len(fields) == 2 and not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", fields[0]):
                raise ConfigError(f"{where} must be a key, or a name (letters, digits, _ . @ -) and its key")
            keys.append((where, fields[-1]))
            if len(fields) == 2:
                names[fields[1]] = fields[0]
        if not any(where.startswith("line") for where, _ in keys):
            raise ConfigError(f"--api-key-file {str(key_file)!r} holds no key (one per line)")
    for where, key in keys:
        if not all("!" <= char <= "~" for char in key):
            raise ConfigError(f"the API key of {where} must be printable ASCII without spaces")
    return tuple(dict.fromkeys(key for _, key in keys)), names


def check_admin_key(value: str | None) -> str | None:
    """--admin-key (or CAKE_ADMIN_KEY): one key, held to the API keys' rule (printable ASCII, no spaces): one the
    header cannot carry as given was never matched (non-ASCII) or a 500 (bytes that are not UTF-8)."""
    if value is None:
        return None
    key = value.strip()
    if not key:
        raise ConfigError("--admin-key (or CAKE_ADMIN_KEY) holds no key")
    if not all("!" <= char <= "~" for char in key):
        raise ConfigError("--admin-key (or CAKE_ADMIN_KEY) must be printable ASCII without spaces")
    return key


def parse_ui_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"--ui-auth must be USER:PASS, got {value!r}")
    try:  # bytes a non-UTF-8 terminal passed (surrogate escapes): every page behind it answered a 500
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"--ui-auth for user {user!r} is not valid UTF-8 (the terminal's encoding?)") from None
    return user, password


def check_cluster_key(key: str | None) -> str | None:
    """A cluster key travels in gRPC metadata, which carries printable ASCII only: anything else would fail every
    call with a cryptic transport error, so it is refused at startup."""
    if key is not None and (not key or not all(" " <= char <= "~" for char in key)):
        raise ConfigError("--cluster-key must be printable ASCII (letters, digits, punctuation), and not empty")
    return key


def check_tls_files(cert: Path | None, key: Path | None, ca: Path | None) -> None:
    """--tls-cert and --tls-key come together, and every file given can be read: checked at startup, before any
    connection would fail on them (a master with no workers would never find out)."""
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both (the certificate and its private key)")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path is None:
            continue
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as error:
            raise ConfigError(f"{flag} {str(path)!r} cannot be read: {error.strerror or error}") from None
    from cake_py.rpc.dataplane_client import client_tls  # the files as PEM: a master with no workers used none

    client_tls(cert, key, ca)


def check_files_dir(path: Path) -> Path:
    """--files-dir: made now if missing, so a path that cannot be a folder is a startup error, not the first
    upload's 500."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--files-dir {str(path)!r} cannot be a folder: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--files-dir {str(path)!r} is not writable")
    return path


def read_chat_template(value: str | None) -> str | None:
    """--chat-template, as vLLM takes it: a file holding a Jinja chat template, or the template itself."""
    if value is None:
        return None
    if not value.strip():
        raise ConfigError("--chat-template is empty: give a template file or a Jinja template")
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # a long one-line template is no file name (ENAMETOOLONG)
        is_file = False
    if not is_file and ("{{" in value or "{%" in value):
        try:  # bytes a non-UTF-8 terminal passed (surrogate escapes): the tokenizer raised on every prompt
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ConfigError(f"--chat-template is not valid UTF-8 (at character {error.start})") from None
        return value
    try:
        exists = path.exists()
    except OSError:
        exists = False
    if not exists:
        raise ConfigError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    try:
        template = read_settings_file(path, "--chat-template").decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"--chat-template: cannot read {value!r}: {error}") from None
    if not template.strip():
        raise ConfigError(f"--chat-template: the file {value!r} is empty")
    return template


def listen_address(host: str, port: int) -> str:
    """HOST:PORT as gRPC reads it: an IPv6 host in brackets ("::" → "[::]:10128")."""
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def check_can_listen(host: str, port: int) -> None:
    """Bind --host:--port once, at startup, before anything is loaded: a port in use or a host that is not this
    machine's is one line naming them, not a late error from the server library. Port 0 binds a free port: the
    host is checked all the same."""
    import socket

    bare = host.strip("[]")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
            probe.bind(address)
    except OSError as error:  # gaierror included
        raise ConfigError(f"cannot listen on {listen_address(host, port)}: {error.strerror or error}") from None
    except UnicodeError:  # idna refuses it (a label over 63 characters, `a..b`, bytes that are not UTF-8)
        raise ConfigError(f"cannot listen on {listen_address(host, port)}: {host!r} is no host name") from None
