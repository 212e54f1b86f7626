"""Which waiting sequences start when slots free up: by priority (lower first: a Batch API request waits while an
interactive one waits), then fairly between requests. The next is the oldest of the request with the fewest running
(a request of a thousand inputs must not hold every slot while a chat waits behind it), among equals of the request
served longest ago, a new one counting as served when it came (in turns: with one slot the many-input request went
first every time; counting new ones as never served, a stream of chats kept it from a second turn)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from cake_py.engine.sequence import Sequence


class Admission:
    """The admission order, and each request's last turn (kept across steps)."""

    def __init__(self) -> None:
        self._admitted: dict[int, float] = {}  # per request, when it last started a sequence (time.monotonic())

    def pick(self, waiting: Iterable[Sequence], running: Iterable[Sequence], room: int) -> list[Sequence]:
        """Up to `room` of the `waiting` sequences (oldest first) to start, in the order they start."""
        by_request: dict[int, list[Sequence]] = {}  # each request's waiting sequences, oldest first
        for seq in waiting:
            by_request.setdefault(seq.request, []).append(seq)
        counts = Counter(seq.request for seq in running)
        heads = {request: 0 for request in by_request}
        picked: list[Sequence] = []
        while heads and len(picked) < room:
            request = min(
                heads,
                key=lambda r: (
                    by_request[r][heads[r]].params.priority,
                    counts[r],
                    self._admitted.get(r, by_request[r][0].created),
                    by_request[r][heads[r]].seq_id,
                ),
            )
            picked.append(by_request[request][heads[request]])
            heads[request] += 1
            if heads[request] == len(by_request[request]):
                del heads[request]
            counts[request] += 1
            self._admitted[request] = time.monotonic()
        if len(self._admitted) > 2 * (len(by_request) + len(counts)) + 64:  # requests long gone
            live = set(by_request) | set(counts)
            self._admitted = {r: n for r, n in self._admitted.items() if r in live}
        return picked
