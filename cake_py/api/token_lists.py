"""Token-id lists in request bodies, checked at C speed (builtins over the whole list, no Python loop per item).

A body under the size limit holds millions of token ids (or a prompt string of millions of characters, where a
check meant for a list walked each character). Checked on the event loop with a generator per item, such a request
stalled every other client's stream for seconds before it was refused; these checks take milliseconds.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, TypeGuard

_MISSING = object()


def only_ids(value: Any) -> TypeGuard[list[int]]:
    """A list of integers and nothing else (bools are not token ids; an empty list is all ids)."""
    return isinstance(value, list) and set(map(type, value)) <= {int}


def ids_and_strings(value: Any) -> TypeGuard[list[int | str]]:
    """A list of integers and strings (llama.cpp's mixed prompts)."""
    return isinstance(value, list) and set(map(type, value)) <= {int, str}


def holds_an_id(value: list[Any]) -> bool:
    return int in set(map(type, value))


def first_not_of(value: list[Any], allowed: tuple[type, ...]) -> Any:
    """The first item of `value` whose type is not one of `allowed` (bool is not int); `_MISSING` if none."""
    types = list(map(type, value))
    firsts = [types.index(kind) for kind in set(types) - set(allowed)]
    return value[min(firsts)] if firsts else _MISSING


def has_bad(item: Any) -> bool:
    return item is not _MISSING


def ids_among(value: list[Any]) -> list[int]:
    """The integers of a mixed list, in order."""
    return list(itertools.compress(value, map(operator.is_, map(type, value), itertools.repeat(int))))


def outside_vocabulary(ids: list[int], vocab_size: int) -> int | None:
    """An id of `ids` (integers) outside [0, vocab_size): the smallest or the largest, whichever comes first; None if
    they all are inside."""
    if not ids:
        return None
    bad = [extreme for extreme in (min(ids), max(ids)) if not 0 <= extreme < vocab_size]
    return min(bad, key=ids.index) if bad else None
