"""Which stored entry goes when a store shared by several API keys is full: the oldest of the owner holding the
most, so that one key filling the store (a batch of a thousand stored responses) evicts its own entries, not
another key's. With one owner (a server with one key or none) that is the oldest entry, as before."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def victim(entries: OrderedDict[str, tuple[T, int]], owner_of: Callable[[T], str], by_size: bool) -> str:
    """The key of the entry to drop: the oldest of the owner with the most entries (or characters, `by_size`)."""
    held: dict[str, int] = {}
    for stored, size in entries.values():
        owner = owner_of(stored)
        held[owner] = held.get(owner, 0) + (size if by_size else 1)
    largest = max(held, key=held.__getitem__)
    return next(key for key, (stored, _) in entries.items() if owner_of(stored) == largest)
