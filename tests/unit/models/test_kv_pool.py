"""KV caches as rows of per-layer pools: rows move when a pool grows or shrinks, and every cache still reads what it
wrote; a padded decode step over pooled and unpooled caches alike."""

from __future__ import annotations

import random

import pytest
import torch

from cake_py.errors import KVMemoryError
from cake_py.models import kv_pool
from cake_py.models.kv_cache import KVStore, LayerCache, SequenceSlice, decode_step
from cake_py.models.kv_pool import PoolSet, RowPool

CPU = torch.device("cpu")


class Owner:
    def __init__(self) -> None:
        self.pool: RowPool | None = None
        self.row = -1

    def bind(self, pool: RowPool, row: int) -> None:
        self.pool, self.row = pool, row


def test_a_pool_grows_by_half_keeps_its_rows_and_rebinds_their_owners_when_they_move() -> None:
    pool = RowPool(2, 4, 3, torch.float32, CPU)
    owners = [Owner() for _ in range(7)]
    for number, owner in enumerate(owners):
        row = pool.take(owner)
        owner.bind(pool, row)
        assert torch.count_nonzero(pool.keys[row]) == 0  # a row taken is zeros
        pool.keys[row].fill_(number)
        pool.values[row].fill_(-number)
    assert pool.n_rows == 9 and pool.n_used == 7  # 1, 2, 3, 4, 6, 9
    for number, owner in enumerate(owners):
        assert owner.pool is pool
        assert torch.all(pool.keys[owner.row] == number) and torch.all(pool.values[owner.row] == -number)


def test_a_pool_mostly_empty_moves_its_rows_down_and_gives_memory_back() -> None:
    pool = RowPool(1, 2, 2, torch.float32, CPU)
    owners = [Owner() for _ in range(9)]
    for number, owner in enumerate(owners):
        owner.bind(pool, pool.take(owner))
        pool.keys[owner.row].fill_(number)
    for owner in owners[:6]:  # the lowest rows go: the ones left sit at the top
        pool.give(owner.row)
    assert pool.n_used == 3 and pool.n_rows == 4  # at a third in use: half again what is used
    for number, owner in zip(range(6, 9), owners[6:], strict=True):
        assert owner.row < 4 and torch.all(pool.keys[owner.row] == number)
    for owner in owners[6:]:
        pool.give(owner.row)
    assert pool.n_rows == 0 and pool.keys.numel() == 0  # an idle pool holds nothing


def test_only_short_caches_are_pooled() -> None:
    pools = PoolSet(1, 2, torch.float32, CPU)
    assert pools.pool(256) is pools.pool(256) and pools.pool(256) is not pools.pool(512)
    assert pools.pool(kv_pool.POOLED_MAX_CAPACITY) is not None
    assert pools.pool(kv_pool.POOLED_MAX_CAPACITY + 256) is None and pools.pool(0) is None


def test_caches_growing_past_each_other_keep_what_they_wrote() -> None:
    """Caches leave a pool for the next one up as they grow: the rows left behind move down, rebound each time."""
    pools = PoolSet(1, 2, torch.float32, CPU)
    caches = [LayerCache(1, 2, torch.float32, CPU, pools=pools) for _ in range(6)]
    for step, length in enumerate((100, 300, 600, 1100, 2100)):
        for index, cache in enumerate(caches[step:], start=step):  # the first ones stop growing, one at a time
            start = cache.length
            written = torch.arange(start, length, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 1, -1, 2) + index
            cache.update(written, -written, start)
    for index, cache in enumerate(caches):
        expected = torch.arange(cache.length, dtype=torch.float32) + index
        assert torch.equal(cache.keys[0, 0, : cache.length, 0], expected)
        assert torch.equal(cache.values[0, 0, : cache.length, 1], -expected)
    assert [cache.pool is not None for cache in caches] == [True] * 4 + [False] * 2  # 2,560 positions: its own


def test_a_released_sequence_gives_its_rows_back() -> None:
    store = KVStore(2, 1, 2, torch.float32, CPU)
    for seq_id in (1, 2, 3):
        for cache in store.for_batch([SequenceSlice(seq_id, 0, 4)])[0]:
            cache.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2), 0)
    row_bytes = 2 * 256 * 2 * 4  # keys and values of 256 positions, float32
    assert store.nbytes == 2 * 3 * row_bytes  # two layers of 3 rows (1, 2, 3: no spare one)
    store.release([2])
    assert store.nbytes == 2 * 3 * row_bytes  # a spare row each: still memory taken
    store.release([1, 3])
    assert store.nbytes == 0


def padded_reference(caches: list[LayerCache], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(positions) + 1
    keys = torch.stack([torch.nn.functional.pad(c.keys[0, :, : p + 1], (0, 0, 0, longest - p - 1)) for c, p in
                        zip(caches, positions, strict=True)])  # fmt: skip
    values = torch.stack([torch.nn.functional.pad(c.values[0, :, : p + 1], (0, 0, 0, longest - p - 1)) for c, p in
                          zip(caches, positions, strict=True)])  # fmt: skip
    return keys, values


@pytest.mark.parametrize("lengths", [(3, 40, 17, 250), (3, 300, 700, 2100, 9)])
def test_a_padded_decode_step_writes_each_token_and_reads_every_cache_from_0(lengths: tuple[int, ...]) -> None:
    """One pool (every cache under 256 positions), or pools of several sizes and a cache of its own."""
    pools = PoolSet(2, 3, torch.float32, CPU)
    generator = torch.Generator().manual_seed(0)
    caches = []
    for length in lengths:
        cache = LayerCache(2, 3, torch.float32, CPU, pools=pools)
        cache.update(torch.randn(1, 2, length, 3, generator=generator), torch.randn(1, 2, length, 3), 0)
        caches.append(cache)
    new_keys, new_values = torch.randn(len(lengths), 2, 3, generator=generator), torch.randn(len(lengths), 2, 3)
    positions = list(lengths)
    keys, values, rows = decode_step(caches, positions, new_keys, new_values)
    if rows is not None:  # a view of the pool's rows: each sequence's where `rows` says
        keys, values = keys[rows], values[rows]
    expected_keys, expected_values = padded_reference(caches, positions)
    for index, position in enumerate(positions):
        assert caches[index].length == position + 1
        assert torch.equal(caches[index].keys[0, :, position], new_keys[index])
        assert torch.equal(keys[index, :, : position + 1], expected_keys[index, :, : position + 1])
        assert torch.equal(values[index, :, : position + 1], expected_values[index, :, : position + 1])
    assert keys.shape == (len(lengths), 2, max(lengths) + 1, 3) and torch.isfinite(keys).all()
    assert torch.isfinite(values).all()


@pytest.mark.parametrize(("released", "a_view"), [((), True), ((2,), True), ((1, 2, 3, 4, 5, 6), False)])
def test_a_padded_decode_step_reads_close_rows_in_place(released: tuple[int, ...], a_view: bool) -> None:
    """Rows of one pool close together are read as a view of the pool from the first to the last (the rows between
    come along, each sequence's where `rows` says); rows far apart are gathered."""
    store = KVStore(1, 2, 3, torch.float32, CPU)
    generator = torch.Generator().manual_seed(1)
    for seq_id in range(8):
        (cache,) = store.for_batch([SequenceSlice(seq_id, 0, 5 + seq_id)])[0]
        cache.update(torch.randn(1, 2, 5 + seq_id, 3, generator=generator), torch.randn(1, 2, 5 + seq_id, 3), 0)
    store.release(released)
    live = [seq_id for seq_id in range(8) if seq_id not in released]
    caches = [store.caches_of(seq_id)[0] for seq_id in live]  # type: ignore[index]
    positions = [cache.length for cache in caches]
    new_keys = torch.randn(len(caches), 2, 3, generator=generator)
    keys, values, rows = decode_step(caches, positions, new_keys, -new_keys)
    pool = caches[0].pool
    assert pool is not None
    assert (rows is not None) == a_view
    assert (keys.untyped_storage().data_ptr() == pool.keys.untyped_storage().data_ptr()) == a_view
    if rows is not None:
        assert keys.shape[0] == max(c.row for c in caches) - min(c.row for c in caches) + 1
        keys, values = keys[rows], values[rows]
    expected_keys, expected_values = padded_reference(caches, positions)
    for index, position in enumerate(positions):
        assert torch.equal(keys[index, :, : position + 1], expected_keys[index, :, : position + 1])
        assert torch.equal(values[index, :, : position + 1], expected_values[index, :, : position + 1])


def test_a_padded_decode_step_refuses_a_cache_that_dropped_its_first_positions() -> None:
    cache = LayerCache(1, 2, torch.float32, CPU, window=4, pools=PoolSet(1, 2, torch.float32, CPU))
    cache.update(torch.ones(1, 1, 10, 2), torch.ones(1, 1, 10, 2), 0)
    cache.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 10)
    with pytest.raises(ValueError, match="holds positions from 8"):
        decode_step([cache], [11], torch.ones(1, 1, 2), torch.ones(1, 1, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_work_on_pooled_caches_reads_the_same_as_caches_of_their_own(seed: int) -> None:
    """Sequences come and go, prefill, decode together, copy another's prefix and roll back, in random order: with
    pools (rows moving all the time) and without, every sequence's caches hold the same positions."""
    rng = random.Random(seed)
    stores = {limit: KVStore(2, 1, 2, torch.float32, CPU, windows=(None, 300)) for limit in (2048, 0)}
    lengths: dict[int, int] = {}
    for step in range(150):
        action = rng.choice(["new", "decode", "decode", "decode", "prefill", "copy", "release", "rollback"])
        live = sorted(lengths)
        batch: list[SequenceSlice] = []
        if action == "new" or not live:
            batch = [SequenceSlice(step + 1000, 0, rng.randint(1, 400))]
        elif action == "decode":
            batch = [SequenceSlice(s, lengths[s], 1) for s in rng.sample(live, rng.randint(1, len(live)))]
        elif action == "prefill":
            seq_id = rng.choice(live)
            batch = [SequenceSlice(seq_id, lengths[seq_id], rng.randint(2, 600))]
        elif action == "copy":
            source = rng.choice(live)
            batch = [SequenceSlice(step + 1000, min(lengths[source], rng.randint(1, 200)), 1, copy_from=source)]
            if not stores[0].caches_of(source)[1].holds_prefix(batch[0].start_pos):  # type: ignore[index]
                continue
        elif action == "release":
            gone = rng.sample(live, rng.randint(1, min(3, len(live))))
            for store in stores.values():
                store.release(gone)
            for seq_id in gone:
                del lengths[seq_id]
            continue
        else:  # a speculative draft rejected: written again from a little earlier (within what a window keeps)
            seq_id = rng.choice(live)
            start = max(0, lengths[seq_id] - rng.randint(1, 4))
            if stores[0].caches_of(seq_id)[1].start > max(0, start - 299):  # type: ignore[index]
                continue
            batch = [SequenceSlice(seq_id, start, 1)]
        for limit, store in stores.items():
            kv_pool.POOLED_MAX_CAPACITY = limit
            try:
                generator = torch.Generator().manual_seed(step)
                per_sequence = store.for_batch(batch)
                for layer, window in enumerate((None, 300)):
                    caches = [layers[layer] for layers in per_sequence]
                    decoding = all(p.n_tokens == 1 for p in batch) and all(
                        window is None or p.start_pos < window for p in batch
                    )
                    if decoding and len(batch) > 1:
                        new = torch.randn(len(batch), 1, 2, generator=generator)
                        decode_step(caches, [p.start_pos for p in batch], new, -new)
                    else:
                        for piece, cache in zip(batch, caches, strict=True):
                            new = torch.randn(1, 1, piece.n_tokens, 2, generator=generator)
                            cache.update(new, -new, piece.start_pos)
            finally:
                kv_pool.POOLED_MAX_CAPACITY = 2048
        for piece in batch:
            lengths[piece.seq_id] = piece.start_pos + piece.n_tokens
        for seq_id in lengths:
            pooled, own = stores[2048].caches_of(seq_id), stores[0].caches_of(seq_id)
            assert pooled is not None and own is not None
            for a, b in zip(pooled, own, strict=True):
                assert (a.start, a.length) == (b.start, b.length)
                held = a.length - a.start
                assert torch.equal(a.keys[:, :, :held], b.keys[:, :, :held])
                assert torch.equal(a.values[:, :, :held], b.values[:, :, :held])
    assert any(cache.pool is not None for caches in stores[2048]._caches.values() for cache in caches)


class FakeMemory:
    """A host with `available` bytes free, the KV caches of `store` (if any) taken out of it as they grow."""

    def __init__(self, available: int, store: KVStore | None = None) -> None:
        self.available, self.store = available, store

    def __call__(self) -> tuple[int, int]:
        used = self.store.nbytes if self.store is not None else 0
        return 1 << 40, self.available - used  # (total, available), as host_memory() answers


@pytest.fixture
def keep_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_pool, "KEEP_FREE_BYTES", 0)
    monkeypatch.setattr(kv_pool, "KEEP_FREE_FRACTION", 0.0)


def test_caches_never_grow_into_the_memory_kept_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_pool, "host_memory", FakeMemory(3 << 30))
    monkeypatch.setattr(kv_pool, "KEEP_FREE_FRACTION", 0.0)
    kv_pool.check_room(1 << 30, CPU)  # 2 GiB left: fine
    with pytest.raises(KVMemoryError, match=r"^not enough memory for the KV caches: 2\.5 GiB more would leave "
                       r"512\.0 MiB of this host's memory free, under the 1\.0 GiB kept free"):  # fmt: skip
        kv_pool.check_room(5 << 29, CPU)
    kv_pool.check_room(1 << 40, torch.device("meta"))  # an accelerator's own allocator says when it is full


@pytest.mark.usefixtures("keep_nothing")
@pytest.mark.parametrize("pooled", [True, False])
def test_a_cache_that_cannot_grow_keeps_what_it_held_and_grows_once_there_is_room(
    monkeypatch: pytest.MonkeyPatch, pooled: bool
) -> None:
    memory = FakeMemory(5 * 256 * 2 * 4)  # keys and values of 256 positions, 2.5 times over
    monkeypatch.setattr(kv_pool, "host_memory", memory)
    cache = LayerCache(1, 2, torch.float32, CPU, pools=PoolSet(1, 2, torch.float32, CPU) if pooled else None)
    cache.update(torch.ones(1, 1, 200, 2), torch.ones(1, 1, 200, 2), 0)
    memory.available -= cache.nbytes
    with pytest.raises(KVMemoryError, match="not enough memory for the KV caches"):
        cache.update(torch.ones(1, 1, 100, 2), torch.ones(1, 1, 100, 2), 200)  # 512 positions: twice as much
    assert cache.length == 200 and cache.keys.shape[2] == 256 and torch.all(cache.keys[0, 0, :200] == 1)
    memory.available += 2 * cache.nbytes
    cache.update(torch.full((1, 1, 100, 2), 2.0), torch.ones(1, 1, 100, 2), 200)  # the same write again
    assert cache.length == 300 and torch.all(cache.keys[0, 0, :200] == 1) and torch.all(cache.keys[0, 0, 200:300] == 2)


@pytest.mark.usefixtures("keep_nothing")
def test_spare_rows_of_every_layer_go_before_a_cache_fails_to_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    store = KVStore(2, 1, 2, torch.float32, CPU)
    row = 2 * 256 * 2 * 4  # keys and values of 256 positions
    memory = FakeMemory(100 * row, store)
    monkeypatch.setattr(kv_pool, "host_memory", memory)
    for seq_id in range(4):
        for cache in store.for_batch([SequenceSlice(seq_id, 0, 10)])[0]:
            cache.update(torch.ones(1, 1, 10, 2), torch.ones(1, 1, 10, 2), 0)
    store.release([1, 2])  # 4 rows a layer, 2 of them spare
    assert store.nbytes == 8 * row
    # 2 rows' worth free: sequence 0 growing to 768 positions needs 3 (a trim needs room for its copy: 2 rows).
    memory.available = 10 * row
    (caches,) = store.for_batch([SequenceSlice(0, 10, 600)])
    for cache in caches:
        cache.update(torch.ones(1, 1, 600, 2), torch.ones(1, 1, 600, 2), 10)
    assert [cache.keys.shape[2] for cache in caches] == [768, 768] and torch.all(caches[1].keys[0, 0, :610] == 1)
    # Each layer: sequence 3's row and the one sequence 0 left (a pool half used keeps it), and the 768-position row.
    assert store.nbytes == 2 * (2 + 3) * row


def test_the_memory_kept_free_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_pool, "host_memory", FakeMemory(3 << 30))
    try:
        kv_pool.set_keep_free(0)  # --keep-free-mb 0: everything available may go
        kv_pool.check_room(3 << 30, CPU)
        kv_pool.set_keep_free(2560 << 20)
        with pytest.raises(KVMemoryError, match="under the 2.5 GiB kept free .`--keep-free-mb`"):
            kv_pool.check_room(1 << 30, CPU)
    finally:
        kv_pool.set_keep_free(None)


def test_a_pool_that_cannot_allocate_its_smaller_copy_stays_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shrink moved rows before allocating the smaller copy: a GPU out of memory just then left a cache bound to
    one row while the pool had moved it to another (a later resize read the stale one back). Now the copy comes
    first, and a failed one keeps the pool as it was."""
    store = KVStore(1, 1, 2, torch.float32, CPU)
    for seq_id in range(6):
        (caches,) = store.for_batch([SequenceSlice(seq_id, 0, 4)])
        caches[0].update(torch.full((1, 1, 4, 2), float(seq_id)), torch.full((1, 1, 4, 2), float(seq_id)), 0)
    store.release([0, 1, 2])
    real = torch.Tensor.new_zeros

    def out_of_memory(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.Tensor, "new_zeros", out_of_memory)
    store.release([3])  # 2 of 6 rows in use: the shrink fails, the release does not
    monkeypatch.setattr(torch.Tensor, "new_zeros", real)
    assert store.sequence_ids() == [4, 5]
    last = store.caches_of(5)[0]  # type: ignore[index]
    last.update(torch.full((1, 1, 1, 2), 55.0), torch.full((1, 1, 1, 2), 55.0), 4)
    store._pools[0].trim_all()  # noqa: SLF001  # rows move now
    assert last.keys[0, 0, :5, 0].tolist() == [5, 5, 5, 5, 55]
    assert store.caches_of(4)[0].keys[0, 0, :4, 0].tolist() == [4, 4, 4, 4]  # type: ignore[index]
    assert store.nbytes == 2 * 2 * 256 * 2 * 4


def test_the_heaps_free_memory_is_handed_back_before_a_cache_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps freed temporaries in its heaps (device.tune_allocator), charged to the process and its container:
    a worker in a tight cgroup refused caches its own heap had room for."""
    readings = iter([(1 << 40, 100 << 20), (1 << 40, 900 << 20)])  # the heap's 800 MiB back after the trim
    trims: list[bool] = []
    monkeypatch.setattr(kv_pool, "host_memory", lambda: next(readings))
    monkeypatch.setattr(kv_pool, "release_free_heap", lambda: trims.append(True) or True)
    kv_pool.set_keep_free(0)
    try:
        kv_pool.check_room(500 << 20, CPU)
        assert trims == [True]
        monkeypatch.setattr(kv_pool, "host_memory", lambda: (1 << 40, 100 << 20))
        monkeypatch.setattr(kv_pool, "release_free_heap", lambda: False)  # nothing to hand back: refused
        with pytest.raises(KVMemoryError):
            kv_pool.check_room(500 << 20, CPU)
    finally:
        kv_pool.set_keep_free(None)


def test_handing_the_heaps_free_memory_back_runs_here() -> None:
    from cake_py.models.device import release_free_heap

    garbage = [bytearray(1 << 20) for _ in range(64)]  # 64 MiB freed into the heap
    del garbage
    assert isinstance(release_free_heap(), bool)


def test_a_pool_whose_rows_are_all_given_back_empties_when_memory_is_shortest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shrink allocates its smaller copy first, and the memory check refused even an empty one once free memory
    was under the margin kept free: after a burst under memory pressure an idle worker kept every pool it had grown
    (230 MB), and each later request was a 503 for want of memory."""
    store = KVStore(2, 1, 2, torch.float32, CPU)
    for seq_id in range(4):
        for cache in store.for_batch([SequenceSlice(seq_id, 0, 10)])[0]:
            cache.update(torch.ones(1, 1, 10, 2), torch.ones(1, 1, 10, 2), 0)
    assert store.nbytes > 0
    monkeypatch.setattr(kv_pool, "host_memory", FakeMemory(1 << 20))
    try:
        kv_pool.set_keep_free(2 << 20)  # 1 MiB free, under the 2 MiB kept free: every check_room refuses
        store.release([0, 1, 2, 3])
        assert store.nbytes == 0
    finally:
        kv_pool.set_keep_free(None)
