"""KVStore bookkeeping read from other threads than the forward's."""

from __future__ import annotations

import pytest
import torch

from cake_py.models.kv_cache import KVStore, LayerCache, SequenceSlice


def test_nbytes_survives_sequences_added_while_it_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    # Info and the dashboard sum the caches while the forward thread adds and frees sequences: here a sequence is
    # added in the middle of the sum, which used to raise "dictionary changed size during iteration".
    store = KVStore(2, 1, 4, torch.float32, torch.device("cpu"))
    store.for_batch([SequenceSlice(1, 0, 1), SequenceSlice(2, 0, 1)])
    real = LayerCache.nbytes.fget
    assert real is not None
    added: list[bool] = []

    def nbytes_that_adds_a_sequence(cache: LayerCache) -> int:
        if not added:
            added.append(True)
            store.for_batch([SequenceSlice(3, 0, 1)])
        return real(cache)

    monkeypatch.setattr(LayerCache, "nbytes", property(nbytes_that_adds_a_sequence))
    assert store.nbytes == 0  # nothing written yet: empty caches
    assert sorted(store.sequence_ids()) == [1, 2, 3]


def test_nbytes_counts_keys_and_values_of_every_sequence() -> None:
    store = KVStore(2, 1, 4, torch.float32, torch.device("cpu"))
    caches = store.for_batch([SequenceSlice(1, 0, 1)])[0]
    caches[0].update(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), 0)
    capacity = caches[0].keys.shape[2]
    assert store.nbytes == 2 * capacity * 4 * 4  # one layer written: keys + values, float32


def test_a_sequence_can_start_as_a_copy_of_anothers_prefix() -> None:
    store = KVStore(n_layers=2, n_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    (source_caches,) = store.for_batch([SequenceSlice(1, 0, 3)])
    for cache in source_caches:
        cache.update(torch.arange(6.0).view(1, 1, 3, 2), torch.arange(6.0).view(1, 1, 3, 2) + 10, 0)
    copy = SequenceSlice(2, 2, 1, copy_from=1)
    store.check_copy(copy)
    (copied,) = store.for_batch([copy])
    assert [cache.length for cache in copied] == [2, 2]
    assert torch.equal(copied[0].keys[:, :, :2], source_caches[0].keys[:, :, :2])
    copied[0].update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 2)
    assert source_caches[0].keys[0, 0, 2].tolist() == [4.0, 5.0]  # the source is untouched
    # The same copy again (a failed step run again) starts over from the source: what was written since is gone.
    store.check_copy(copy)
    (again,) = store.for_batch([copy])
    assert [cache.length for cache in again] == [2, 2]
    assert torch.equal(again[0].keys[:, :, :2], source_caches[0].keys[:, :, :2])
    with pytest.raises(ValueError, match="which holds 3"):
        store.check_copy(SequenceSlice(3, 4, 1, copy_from=1))


def test_reading_a_sequences_caches_counts_as_use_and_a_release_drops_what_lives_beside_them() -> None:
    """A graphed decode step only reads the caches: the worker's idle reaper must still see the sequence as live."""
    store = KVStore(n_layers=1, n_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    store.for_batch([SequenceSlice(1, 0, 1)])
    store._last_used[1] -= 1000  # untouched for 1000 s
    assert store.caches_of(1) is not None
    assert store.release_idle(10) == []  # the read just now counts
    store.graphs[1] = "a recorded step"
    store.release([1])
    assert store.caches_of(1) is None and store.graphs == {}


def test_copying_a_sequence_counts_as_using_it() -> None:
    store = KVStore(1, 2, 4, torch.float32, torch.device("cpu"))
    store.for_batch([SequenceSlice(1, 0, 3)])[0][0].update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    store._last_used[1] -= 100  # noqa: SLF001  # written long ago
    store.for_batch([SequenceSlice(2, 2, 1, copy_from=1)])
    assert store.release_idle(50) == []  # a kept prefix copied just now is in use


def test_a_cache_doubles_while_small_then_grows_by_a_quarter() -> None:
    """A 4,300-token conversation's cache doubled to 8,192 positions (half of it unused); kept caches count what
    they take, so it filled the whole default prefix-cache budget alone."""
    from cake_py.models.kv_cache import LayerCache
    from cake_py.models.kv_layout import grown_capacity

    cache = LayerCache(1, 2, torch.float32, torch.device("cpu"))
    capacities = []
    for start in range(0, 4608, 512):  # a prefill in chunks of 512
        cache.update(torch.zeros(1, 1, 512, 2), torch.zeros(1, 1, 512, 2), start)
        capacities.append(cache.keys.shape[2])
    assert capacities[:5] == [512, 1024, 2048, 2048, 2560] and capacities[-1] == 5632  # doubling: 8,192
    assert grown_capacity(300, 301) == 768 and grown_capacity(4096, 4097) == 5120 and grown_capacity(512, 100) == 512
