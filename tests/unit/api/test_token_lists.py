"""The token-list checks (token_lists.py) say what the Python loops they replace said; what they save the event
loop is measured in test_loop_cost.py."""

from __future__ import annotations

from cake_py.api.token_lists import first_not_of, has_bad, ids_among, ids_and_strings, only_ids, outside_vocabulary


def test_the_checks() -> None:
    assert only_ids([1, 2, 3]) and only_ids([]) and not only_ids([1, True]) and not only_ids([1, 2.0])
    assert not only_ids("123") and not only_ids(None)
    assert ids_and_strings([1, "a", 2]) and not ids_and_strings([1, None]) and not ids_and_strings("ab")
    assert first_not_of([1, "a", None, 2.5, False], (int, str)) is None
    assert first_not_of([1, "a", 2.5, None, False], (int, str)) == 2.5
    assert not has_bad(first_not_of([1, "a"], (int, str)))
    assert ids_among([1, "a", 2, True, "b", 3]) == [1, 2, 3]
    assert outside_vocabulary([0, 5, 9], 10) is None and outside_vocabulary([], 10) is None
    assert outside_vocabulary([3, 12, -1], 10) == 12 and outside_vocabulary([3, -1, 12], 10) == -1
