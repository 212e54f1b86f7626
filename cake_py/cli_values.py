"""Value types of the `cake` command's flags: each turns a flag's text into its value or raises argparse's
ArgumentTypeError naming it (argparse prints that as one line and exits 2)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def at_least_one(value: str) -> int:
    number = positive_int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def port(value: str) -> int:
    number = positive_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (0-65535)")
    return number


def host(value: str) -> str:
    """--host: an address or a name; empty (`--host "$UNSET"`) is refused, not taken as every interface."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is no address: give one such as 127.0.0.1, or 0.0.0.0 for all")
    return value.strip()


def display_name(value: str) -> str:
    """--name, --model-name: a name shown in the API, the topology and the logs; empty (an unset variable), holding
    a line break or another control character (a forged log line) or not UTF-8 is refused, not replaced silently."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is no name: leave the flag out for the default")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise argparse.ArgumentTypeError(f"{value!r} holds a control character (a line break?)")
    try:  # bytes a non-UTF-8 terminal passed (surrogate escapes): every response naming the model was a 500
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not valid UTF-8 (the terminal's encoding?)") from None
    return value.strip()


def folder(value: str) -> Path:
    """--cache-dir, --files-dir: empty (`--cache-dir "$UNSET"`) is refused, not taken as the working directory."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is no folder: leave the flag out for the default")
    return Path(value)


def data_port(value: str) -> int:
    return -1 if value.strip() == "-1" else port(value)


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number


def seconds_or_off(value: str) -> float:
    """A duration in seconds, 0 turning the feature off."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be 0 (off) or a positive number of seconds")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number")
    return number


MAX_TIMEOUT_S = 24 * 3600.0  # past ~9e9 s a gRPC deadline overflows, and fails at once


def timeout_seconds(value: str) -> float:
    number = positive_float(value)
    if number > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{value!r} seconds is more than a day ({MAX_TIMEOUT_S:g} s)")
    return number


def thread_count(value: str) -> int:
    """Torch threads: at least 1, at most 4 per CPU of this machine (thousands of OpenMP threads crash or stall)."""
    number = at_least_one(value)
    limit = 4 * (os.cpu_count() or 1)
    if number > limit:
        raise argparse.ArgumentTypeError(f"{value!r} threads is more than {limit} (4 per CPU of this machine)")
    return number


def seed(value: str) -> int | None:
    """A sampling seed; -1 is a random one, as llama.cpp's -s -1 (and its HTTP routes' seed) reads it."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    return None if number == -1 else number


def gigabytes(value: str) -> int:
    """A size in GB (decimal, as disks are sold) → bytes; 0 allowed."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of GB") from None
    if not 0 <= number < 1e9:
        raise argparse.ArgumentTypeError(f"{value!r} must be a size in GB, 0 or more")
    if 0 < number * 1e9 < 1:  # it would be 0 bytes, which these flags read as no limit at all
        raise argparse.ArgumentTypeError(f"{value!r} GB is less than a byte (0 means no limit)")
    return int(number * 1e9)
