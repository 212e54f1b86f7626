"""The names a master shows its workers under (cake_py.cluster.names)."""

from __future__ import annotations

from cake_py.cluster.names import WorkerNames
from cake_py.config import WorkerSpec


def test_worker_names_keep_an_adopted_name_and_take_a_new_unique_one() -> None:
    names = WorkerNames()
    named, first, second = (
        WorkerSpec("gpu", "h:1"),
        WorkerSpec("worker-2", "h:2", named=False),
        WorkerSpec("worker-3", "h:3", named=False),
    )
    assert names.shown(named) == named and names.shown(first) == first  # nothing adopted yet
    shown = names.adopt(first, "alpha")
    names.adopt(second, "beta")
    assert names.shown(first).name == "alpha"  # a later connection (a failed one too) says what /health says
    assert names.renamed(shown, "beta") is None and names.renamed(shown, "gpu") is None  # another's name
    assert names.renamed(shown, "master") is None and names.renamed(named, "other") is None
    renamed = names.renamed(shown, "gamma")
    assert renamed is not None and renamed.name == "gamma" and names.shown(first).name == "gamma"
    assert names.adopt(first, None) == first and names.shown(first).name == "worker-2"  # names no longer unique
