"""The flags' value types: each value in range passes as its number, each other one names itself in the error."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

import pytest

from cake_py import cli_values


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [
        (cli_values.port, "8080", 8080),
        (cli_values.data_port, "-1", -1),
        (cli_values.at_least_one, "1", 1),
        (cli_values.positive_int, "0", 0),
        (cli_values.seconds_or_off, "0", 0.0),
        (cli_values.seconds_or_off, "2.5", 2.5),
        (cli_values.positive_float, "0.5", 0.5),
        (cli_values.timeout_seconds, "86400", 86400.0),
        (cli_values.thread_count, "4", 4),
        (cli_values.gigabytes, "0", 0),
        (cli_values.gigabytes, "2.5", 2_500_000_000),
        (cli_values.gigabytes, "1e-9", 1),
    ],
)
def test_values_in_range_pass(kind: Callable[[str], Any], text: str, value: Any) -> None:
    assert kind(text) == value


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (cli_values.port, "65536"),
        (cli_values.data_port, "-2"),
        (cli_values.at_least_one, "0"),
        (cli_values.positive_int, "-3"),
        (cli_values.positive_int, "x"),
        (cli_values.seconds_or_off, "-1"),
        (cli_values.seconds_or_off, "nan"),
        (cli_values.positive_float, "0"),
        (cli_values.positive_float, "inf"),
        (cli_values.positive_float, "nan"),
        (cli_values.timeout_seconds, "1e10"),  # past ~9e9 s a gRPC deadline overflows and fails at once
        (cli_values.thread_count, "0"),
        (cli_values.thread_count, "99999999999999999999"),  # torch.set_num_threads overflowed; 100000 segfaulted
        (cli_values.gigabytes, "-1"),
        (cli_values.gigabytes, "1e-10"),  # 0.1 byte became 0: no limit, the opposite of a tiny one
    ],
)
def test_values_out_of_range_are_named(kind: Callable[[str], Any], text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        kind(text)


@pytest.mark.parametrize("text", ["", " ", "a\nb", "caf\udce9"])  # the last: Latin-1 bytes as Python passes them
def test_names_that_cannot_be_shown_are_named(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
        cli_values.display_name(text)


@pytest.mark.parametrize("text", ["", " "])
def test_an_empty_folder_is_refused_not_the_working_directory(text: str) -> None:
    """--cache-dir "$UNSET" cached every weight in the directory the worker was started from (Path("") is ".")."""
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{text!r} is no folder")):
        cli_values.folder(text)
