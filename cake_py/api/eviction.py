"""Which stored entry goes when a store shared by several API keys is full: the oldest of the owner holding the
most, so that one key filling the store (a batch of a thousand stored responses) evicts its own entries, not
another key's. With one owner (a server with one key or none) that is the oldest entry, as before."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def victim(
    entries: OrderedDict[str, tuple[T, int]],
    owner_of: Callable[[T], str],
    by_size: bool,
    keep: str,
    only: str | None = None,
) -> str | None:
    """The key of the entry to drop: the oldest of the owner with the most entries (or characters, `by_size`), never
    `keep` (the entry just stored: its client was told it is stored). Another owner's when that owner holds only
    `keep`; None when nothing else is left. With `only`, that owner's entries alone are candidates (an entry larger
    than the whole store makes room among its own owner's, never by clearing every other key's)."""
    held: dict[str, int] = {}
    oldest: dict[str, str] = {}  # owner → its oldest entry but `keep`
    for key, (stored, size) in entries.items():
        owner = owner_of(stored)
        held[owner] = held.get(owner, 0) + (size if by_size else 1)
        if key != keep and (only is None or owner == only):
            oldest.setdefault(owner, key)
    if not oldest:
        return None
    return oldest[max(oldest, key=held.__getitem__)]
