"""A placement that fails part-way leaves no worker holding layers of it (real worker processes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cake_py.api.server import build_pipeline
from cake_py.config import ServeSettings
from cake_py.errors import ClusterError
from cake_py.models.hub import resolve_model
from cake_py.rpc.connection import WorkerConnection
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("bad-placement")) as running:
        yield running


def test_workers_given_their_layers_drop_them_when_another_worker_refuses_its_own(
    cluster: LocalCluster, tiny_model_factory: TinyModelFactory
) -> None:
    """The master closed its channels and left: the first worker had freed its old layers for the new ones, and held
    a third of a model nothing would run until some master assigned it again (a `cake serve` that failed to start
    never would)."""
    first = cluster.worker(name="first")
    refusing = cluster.worker("--cache-max-gb", "0.00001", name="refusing")  # 10 kB: no room for its layers
    first.start()
    refusing.start()
    source = resolve_model(str(tiny_model_factory("llama")))
    workers = [first.spec((0, 2)), refusing.spec((2, 3))]
    settings = ServeSettings(model=source.model_id, workers=workers, dtype="float32", device="cpu")
    with pytest.raises(ClusterError, match="refusing"):
        build_pipeline(settings, source, "cpu")
    connection = WorkerConnection(first.spec(), None, None)
    try:
        info = connection.info()
    finally:
        connection.close()
    assert (info.assignment, info.weights_bytes, info.model_id) == (0, 0, ""), info
