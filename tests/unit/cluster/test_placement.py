"""Layer placement, table-style: manual ranges (cluster.yaml) are checked; automatic ones follow speed and memory."""

from __future__ import annotations

import random

import pytest

from cake_py.cluster.placement import MEMORY_HEADROOM, NodeCapacity, check_manual, place_automatically
from cake_py.errors import ClusterError

GB = 10**9
Ranges = dict[str, tuple[int, int]]


def node(name: str, free_gb: float, tflops: float) -> NodeCapacity:
    return NodeCapacity(name, int(free_gb * GB), tflops)


def assert_contiguous_cover(ranges: Ranges, order: list[str], n_layers: int) -> None:
    """Ranges follow the node order, touch end to end, and cover every layer exactly once."""
    assert list(ranges) == order
    position = 0
    for name in order:
        start, end = ranges[name]
        assert start == position, f"{name} starts at {start}, expected {position}"
        assert end >= start
        position = end
    assert position == n_layers


# ---- automatic placement ----


@pytest.mark.parametrize(
    ("n_layers", "nodes", "expected"),
    [
        # One node takes everything.
        (30, [node("a", 100, 1.0)], {"a": (0, 30)}),
        # Equal speed: equal shares, in the order the workers are listed.
        (30, [node("a", 100, 1.0), node("b", 100, 1.0)], {"a": (0, 15), "b": (15, 30)}),
        (
            30,
            [node("a", 100, 1.0), node("b", 100, 1.0), node("c", 100, 1.0)],
            {"a": (0, 10), "b": (10, 20), "c": (20, 30)},
        ),
        # Proportional to speed: 2:1 and 1:3.
        (30, [node("fast", 100, 2.0), node("slow", 100, 1.0)], {"fast": (0, 20), "slow": (20, 30)}),
        (24, [node("slow", 100, 1.0), node("fast", 100, 3.0)], {"slow": (0, 6), "fast": (6, 24)}),
        (12, [node("a", 100, 1.0), node("b", 100, 2.0), node("c", 100, 3.0)], {"a": (0, 2), "b": (2, 6), "c": (6, 12)}),
        # No speed figure at all (0 TFLOPS everywhere): equal shares.
        (10, [node("a", 100, 0.0), node("b", 100, 0.0)], {"a": (0, 5), "b": (5, 10)}),
        # Memory caps the fast node at 4 layers of 1 GB (5 GB free x 0.8); the slow one takes the rest.
        (10, [node("fast", 5, 10.0), node("slow", 100, 1.0)], {"fast": (0, 4), "slow": (4, 10)}),
        # A capped node in the middle: the nodes after it share what it could not take.
        (
            12,
            [node("a", 100, 1.0), node("tiny", 2.5, 1.0), node("c", 100, 1.0)],
            {"a": (0, 4), "tiny": (4, 6), "c": (6, 12)},
        ),
    ],
)
def test_automatic_placement_follows_speed_and_memory(
    n_layers: int, nodes: list[NodeCapacity], expected: Ranges
) -> None:
    ranges = place_automatically([GB] * n_layers, nodes)
    assert ranges == expected
    assert_contiguous_cover(ranges, [n.name for n in nodes], n_layers)


def test_last_node_capped_falls_back_to_filling_by_memory() -> None:
    # Speed says b takes 8 of 10 layers, but b only has room for 2: a (room for 8) takes the rest.
    ranges = place_automatically([GB] * 10, [node("a", 10, 1.0), node("b", 2.5, 4.0)])
    assert ranges == {"a": (0, 8), "b": (8, 10)}


def test_a_capped_last_node_still_gets_its_share_and_the_first_the_rest() -> None:
    # Speed says gpu takes 9 of 10 layers; its memory holds 7: it keeps 7 and cpu takes 3 (not 10, leaving gpu none).
    ranges = place_automatically([GB] * 10, [node("cpu", 100, 1.0), node("gpu", 9, 9.0)])
    assert ranges == {"cpu": (0, 3), "gpu": (3, 10)}


def test_workers_sharing_one_memory_share_its_budget() -> None:
    # Two workers on one host each report the host's 50 GB free: together they hold 40 GB of layers, not 80.
    same_host = [NodeCapacity("a", 50 * GB, 1.0, "host/cpu"), NodeCapacity("b", 50 * GB, 1.0, "host/cpu")]
    with pytest.raises(ClusterError, match="fits nowhere"):
        place_automatically([GB] * 60, same_host)
    assert place_automatically([GB] * 40, same_host) == {"a": (0, 20), "b": (20, 40)}
    # Shared in proportion to speed: a 3x faster worker gets 3/4 of the pool (30 GB: 24 layers at most).
    uneven = [NodeCapacity("slow", 40 * GB, 1.0, "host/cpu"), NodeCapacity("fast", 40 * GB, 3.0, "host/cpu")]
    assert place_automatically([GB] * 32, uneven) == {"slow": (0, 8), "fast": (8, 32)}
    # Other pools (another host, or another GPU of the same host) are not shared.
    apart = [NodeCapacity("a", 50 * GB, 1.0, "h1/cpu"), NodeCapacity("b", 50 * GB, 1.0, "h2/cpu")]
    assert place_automatically([GB] * 60, apart) == {"a": (0, 30), "b": (30, 60)}


def test_a_restarted_master_counts_what_every_worker_of_a_host_holds() -> None:
    # 25 GB host, two workers holding 9 GB of layers each: each sees 7 GB free plus its own 9 GB, so 16 GB. The
    # host has 7 + 9 + 9 = 25 GB for the model again, not 16.
    held = [NodeCapacity(name, 16 * GB, 1.0, "host/cpu", held_bytes=9 * GB) for name in ("a", "b")]
    assert place_automatically([GB] * 18, held) == {"a": (0, 9), "b": (9, 18)}
    nothing_held = [NodeCapacity(name, 16 * GB, 1.0, "host/cpu") for name in ("a", "b")]
    with pytest.raises(ClusterError, match="fits nowhere"):
        place_automatically([GB] * 18, nothing_held)


def test_memory_cap_uses_each_layers_own_size() -> None:
    # Layer 0 is large (an embedding-heavy first layer, say): 3 GB + 1 GB fit in a's 4 GB budget, the next does not.
    sizes = [3 * GB, GB, GB, GB, GB]
    ranges = place_automatically(sizes, [node("a", 5, 100.0), node("b", 100, 1.0)])
    assert ranges == {"a": (0, 2), "b": (2, 5)}
    used = sum(sizes[slice(*ranges["a"])])
    assert used <= 5 * GB * MEMORY_HEADROOM


def test_a_very_slow_node_may_get_no_layers_but_every_layer_is_placed() -> None:
    ranges = place_automatically([GB] * 4, [node("fast", 100, 100.0), node("snail", 100, 0.01)])
    assert ranges == {"fast": (0, 4), "snail": (4, 4)}


@pytest.mark.parametrize("seed", range(40))
def test_random_clusters_place_every_layer_contiguously_within_memory(seed: int) -> None:
    rng = random.Random(seed)
    n_layers = rng.randint(1, 40)
    sizes = [rng.randint(1, 4) * GB for _ in range(n_layers)]
    nodes = [node(f"n{i}", rng.uniform(1, 60), rng.uniform(0.0, 5.0)) for i in range(rng.randint(1, 5))]
    try:
        ranges = place_automatically(sizes, nodes)
    except ClusterError as error:
        # Allowed only when the layers really do not fit: in total, or in contiguous pieces (checked by brute force).
        assert "fit" in str(error)
        assert not _fits_somehow(sizes, [n.free_bytes * MEMORY_HEADROOM for n in nodes])
        return
    assert_contiguous_cover(ranges, [n.name for n in nodes], n_layers)
    for n in nodes:
        start, end = ranges[n.name]
        assert sum(sizes[start:end]) <= n.free_bytes * MEMORY_HEADROOM, f"{n.name} holds more than its memory"


def _fits_somehow(sizes: list[int], budgets: list[float]) -> bool:
    """Whether some split of `sizes` into len(budgets) contiguous runs, in order, fits every budget."""
    reachable = {0}  # layers placed so far, over every way of filling the nodes seen
    for budget in budgets:
        reachable = {
            end for start in reachable for end in range(start, len(sizes) + 1) if sum(sizes[start:end]) <= budget
        }
    return len(sizes) in reachable


def test_model_that_fits_nowhere_is_an_error_naming_the_sizes() -> None:
    with pytest.raises(ClusterError, match=r"needs 10\.00 GB .* 4\.00 GB usable: it fits nowhere"):
        place_automatically([GB] * 10, [node("a", 2.5, 1.0), node("b", 2.5, 1.0)])


def test_enough_memory_in_total_but_not_in_contiguous_pieces_names_the_layers() -> None:
    # 4.5 GB of layers and 4.8 GB usable in total, but each node has room for one 1.5 GB layer: layer 2 is left.
    with pytest.raises(ClusterError, match=r"layers 2-2 fit on no worker"):
        place_automatically([3 * GB // 2] * 3, [node("a", 3, 1.0), node("b", 3, 1.0)])


def test_no_workers_is_an_error() -> None:
    with pytest.raises(ClusterError, match="no workers"):
        place_automatically([GB] * 3, [])


# ---- manual placement (cluster.yaml) ----


@pytest.mark.parametrize(
    ("given", "n_layers", "expected"),
    [
        ({"a": (0, 15), "b": (15, 30)}, 30, {"a": (0, 15), "b": (15, 30)}),
        # Listed out of layer order: fine, ranges are what count.
        ({"b": (15, 30), "a": (0, 15)}, 30, {"b": (15, 30), "a": (0, 15)}),
        # Layers nobody holds stay on the master: the first, the middle and the last.
        ({"a": (1, 3)}, 4, {"a": (1, 3)}),
        ({"a": (0, 1), "b": (2, 3)}, 3, {"a": (0, 1), "b": (2, 3)}),
        ({"a": (0, 29)}, 30, {"a": (0, 29)}),
        # No layers anywhere: automatic placement decides (nothing to check).
        ({"a": None, "b": None}, 30, {}),
    ],
)
def test_valid_manual_ranges(given: dict[str, tuple[int, int] | None], n_layers: int, expected: Ranges) -> None:
    assert check_manual(given, n_layers) == expected


@pytest.mark.parametrize(
    ("given", "n_layers", "message"),
    [
        # Overlap: both workers and the shared layers are named.
        (
            {"gpu-1": (0, 16), "gpu-2": (15, 30)},
            30,
            r"'gpu-1' \(layers 0-15\) and 'gpu-2' \(layers 15-29\) overlap on layer 15",
        ),
        ({"a": (0, 10), "b": (5, 8)}, 30, r"'a' \(layers 0-9\) and 'b' \(layers 5-7\) overlap on layers 5-7"),
        (
            {"a": (0, 3), "b": (3, 6), "c": (4, 10)},
            30,
            r"'b' \(layers 3-5\) and 'c' \(layers 4-9\) overlap on layers 4-5",
        ),
        ({"a": (2, 3), "b": (2, 3)}, 30, r"'a' \(layer 2\) and 'b' \(layer 2\) overlap on layer 2"),
        # Out of range: the worker, its layers and the model's range.
        ({"a": (0, 15), "big": (15, 31)}, 30, r"worker 'big': layers 15-30 out of range \(the model has layers 0-29\)"),
        ({"far": (40, 41)}, 30, r"worker 'far': layer 40 out of range"),
        # Empty.
        ({"a": (3, 3)}, 30, r"worker 'a': empty layer range"),
        # Partially specified: the workers without layers are named.
        ({"a": (0, 10), "b": None, "c": None}, 30, r"worker\(s\) 'b', 'c' have no layers while others do"),
    ],
)
def test_invalid_manual_ranges_name_the_workers_and_layers(
    given: dict[str, tuple[int, int] | None], n_layers: int, message: str
) -> None:
    with pytest.raises(ClusterError, match=message):
        check_manual(given, n_layers)


def test_memory_pools_are_a_hosts_ram_or_one_gpu() -> None:
    from types import SimpleNamespace

    from cake_py.cluster.master import memory_pool

    def host(name: str, memory_id: str, device: str = "cuda") -> object:
        return SimpleNamespace(hostname=name, memory_id=memory_id, device=device)

    # Two workers on one box, each given one of its GPUs (both see it as cuda:0): two pools, not one.
    assert memory_pool(host("box", "cuda-GPU-1")) != memory_pool(host("box", "cuda-GPU-2"))
    assert memory_pool(host("box", "ram", "cpu")) == memory_pool(host("box", "ram", "mps"))  # unified memory
    assert memory_pool(host("box", "", "cpu")) == "box/cpu"  # a worker older than memory_id: as before


def test_memory_the_master_takes_in_a_workers_pool_is_not_given_to_it() -> None:
    # The master's embedding and head (10 GB) go on the GPU one of the workers uses: that worker has 20 GB left.
    gpu = [NodeCapacity("same-gpu", 30 * GB, 1.0, "box/cuda-1"), NodeCapacity("other", 30 * GB, 1.0, "box/cuda-2")]
    assert place_automatically([GB] * 40, gpu) == {"same-gpu": (0, 20), "other": (20, 40)}
    reserved = {"box/cuda-1": 10 * GB}
    assert place_automatically([GB] * 40, gpu, reserved) == {"same-gpu": (0, 16), "other": (16, 40)}
    # Shared by two workers, the pool is split after the master's share is taken out.
    pool = [NodeCapacity(name, 30 * GB, 1.0, "box/cuda-1") for name in ("a", "b")]
    assert place_automatically([GB] * 16, pool, reserved) == {"a": (0, 8), "b": (8, 16)}
    with pytest.raises(ClusterError, match="fits nowhere"):
        place_automatically([GB] * 17, pool, reserved)
    # A pool no worker uses changes nothing.
    assert place_automatically([GB] * 40, gpu, {"elsewhere/ram": 100 * GB}) == {"same-gpu": (0, 20), "other": (20, 40)}
