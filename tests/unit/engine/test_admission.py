"""The admission order: priority, then the request with the fewest running, then turns, then age."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from cake_py.engine.admission import Admission


def seq(seq_id: int, request: int, priority: int = 0) -> Any:
    time.sleep(0.001)  # each one comes after the last
    return SimpleNamespace(
        seq_id=seq_id, request=request, params=SimpleNamespace(priority=priority), created=time.monotonic()
    )


def test_one_slot_goes_to_requests_in_turns() -> None:
    """With one slot, the six inputs of request 1 went first every time: a chat sent after them waited for all."""
    admission = Admission()
    waiting = [seq(index, 1) for index in range(1, 7)] + [seq(7, 2)]
    order = []
    while waiting:
        (started,) = admission.pick(waiting, [], 1)
        order.append(started.seq_id)
        waiting.remove(started)
    assert order == [1, 7, 2, 3, 4, 5, 6]


def test_a_stream_of_new_requests_does_not_keep_an_older_one_from_its_turns() -> None:
    """A request never served counted as served before all others: chats arriving as fast as they were served kept
    a many-input request from ever starting its second input."""
    admission = Admission()
    waiting = [seq(1, 1), seq(2, 1), seq(3, 1), seq(10, 10)]
    started = []
    for turn in range(8):
        (picked,) = admission.pick(waiting, [], 1)
        started.append(picked.request)
        waiting.remove(picked)
        waiting.append(seq(11 + turn, 11 + turn))  # a new chat after each turn
    assert started.count(1) == 3 and started[0] == 1, started


def test_priority_then_fewest_running_then_age() -> None:
    admission = Admission()
    running = [seq(1, 1), seq(2, 1)]
    waiting = [seq(3, 1), seq(4, 2), seq(5, 3, priority=1), seq(6, 4, priority=-1)]
    assert [s.seq_id for s in admission.pick(waiting, running, 3)] == [6, 4, 3]
    assert admission.pick(waiting, running, 0) == []
    assert [s.seq_id for s in admission.pick(waiting, [], 10)] == [6, 4, 3, 5]  # turns: 1 was served last
    assert [s.seq_id for s in Admission().pick(waiting, [], 10)] == [6, 3, 4, 5]  # none served yet: by age
