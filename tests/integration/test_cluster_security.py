"""Startup errors through the real CLI, the cluster key, and TLS (with certificates this module makes with openssl)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cake_py.api.server import build_pipeline
from cake_py.cluster.pipeline import Pipeline, local_pipeline
from cake_py.config import ServeSettings, WorkerSpec
from cake_py.errors import ClusterError, StageError
from cake_py.models.hub import ModelSource, resolve_model
from cake_py.models.kv_cache import SequenceSlice
from cake_py.rpc.client import RemoteStage, WorkerConnection
from cake_py.rpc.dataplane_client import DataPlaneClient
from tests.conftest import TinyModelFactory
from tests.fixtures.cluster import LocalCluster, WorkerProcess, free_port, generate_tokens, run_cake
from tests.fixtures.tls import Certificates, make_certificates

pytestmark = pytest.mark.timeout(120)

PROMPT = "The quick brown cake bakes over the river"


@pytest.fixture(scope="module")
def tiny(tiny_model_factory: TinyModelFactory) -> Path:
    return tiny_model_factory("llama")  # 3 layers


@pytest.fixture(scope="module")
def llama(tiny: Path) -> ModelSource:
    return resolve_model(str(tiny))


@pytest.fixture(scope="module")
def single_node_tokens(llama: ModelSource) -> list[int]:
    return generate_tokens(local_pipeline(llama, torch.float32), llama.tokenizer, llama.tokenizer.encode(PROMPT))


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed with exactly one line on stderr and no traceback; returns that line."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cake: error: "), lines[0]
    return lines[0]


def serve_args(model: Path, *flags: str) -> list[str]:
    return ["serve", str(model), "--port", str(free_port()), "--device", "cpu", "--dtype", "float32", *flags]


# ---- 4. startup errors through `cake serve` ----


def test_unreachable_worker_is_one_line_naming_it(tiny: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = run_cake(*serve_args(tiny, "--workers", address, "--connect-timeout", "1"))
    line = one_line_error(result)
    assert address in line and "unreachable" in line, line


def write_cluster_yaml(path: Path, layers: dict[str, str]) -> Path:
    """cluster.yaml for workers that do not exist: topology errors must come before any worker is contacted."""
    entries = "".join(
        f'  - name: {name}\n    address: 127.0.0.1:{free_port()}\n    layers: "{value}"\n'
        for name, value in layers.items()
    )
    path.write_text(f"workers:\n{entries}")
    return path


def test_overlapping_layers_name_both_workers_and_the_layers(tmp_path: Path, tiny: Path) -> None:
    config = write_cluster_yaml(tmp_path / "cluster.yaml", {"box-a": "0-1", "box-b": "1-2"})
    # The error must not wait for the (absent) workers: 600 s of connecting would outlast the run's 60 s. (The
    # default 10 s against an 8 s run left a loaded machine's start, torch's import and all, under a second.)
    line = one_line_error(run_cake(*serve_args(tiny, "--config", str(config), "--connect-timeout", "600")))
    assert "'box-a' (layers 0-1)" in line and "'box-b' (layers 1-2)" in line and "overlap on layer 1" in line, line


def test_out_of_range_layers_name_the_worker(tmp_path: Path, tiny: Path) -> None:
    config = write_cluster_yaml(tmp_path / "cluster.yaml", {"box-a": "0-0", "too-far": "1-3"})
    line = one_line_error(run_cake(*serve_args(tiny, "--config", str(config), "--connect-timeout", "600")))
    assert "worker 'too-far': layers 1-3 out of range" in line and "0-2" in line, line


def test_the_same_worker_listed_twice_is_an_error(llama: ModelSource) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = ServeSettings(workers=[WorkerSpec("one", address), WorkerSpec("two", address)], dtype="float32")
    with pytest.raises(ClusterError, match=rf"workers 'one' and 'two' have the same address {address}"):
        build_pipeline(settings, llama, "cpu")


# ---- TLS material, made with the openssl CLI ----


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@dataclass(frozen=True)
class SecureWorkers:
    keyed: WorkerProcess  # --cluster-key right
    keyed_too: WorkerProcess  # another, for chained forwards between keyed workers
    tls: WorkerProcess  # --tls-cert/--tls-key
    mutual: WorkerProcess  # ... and --tls-ca: masters must present a certificate from that CA
    mutual_too: WorkerProcess  # another, for chained forwards over TLS


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, certificates: Certificates) -> Iterator[SecureWorkers]:
    server = ["--tls-cert", str(certificates.server_cert), "--tls-key", str(certificates.server_key)]
    with LocalCluster(tmp_path_factory.mktemp("secure")) as cluster:
        workers = SecureWorkers(
            keyed=cluster.worker("--cluster-key", "right", name="keyed"),
            keyed_too=cluster.worker("--cluster-key", "right", name="keyed-too"),
            tls=cluster.worker(*server, name="tls"),
            mutual=cluster.worker(*server, "--tls-ca", str(certificates.ca), name="mutual"),
            mutual_too=cluster.worker(*server, "--tls-ca", str(certificates.ca), name="mutual-too"),
        )
        every = (workers.keyed, workers.keyed_too, workers.tls, workers.mutual, workers.mutual_too)
        for worker in every:
            worker.launch()  # side by side: their startups overlap
        for worker in every:
            worker.wait_ready()
        yield workers


def settings_for(
    worker: WorkerProcess,
    *,
    cluster_key: str | None = None,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    connect_timeout: float = 2.0,
) -> ServeSettings:
    return ServeSettings(
        workers=[worker.spec()],
        dtype="float32",
        device="cpu",
        cluster_key=cluster_key,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        connect_timeout=connect_timeout,
    )


def assert_serves(settings: ServeSettings, llama: ModelSource, expected: list[int]) -> None:
    pipeline = build_pipeline(settings, llama, "cpu")
    try:
        assert generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT)) == expected
        # Hidden states took the fast path, with TLS whenever the gRPC link has it.
        expected_transport = "fast+tls" if settings.tls_ca else "fast"
        assert [s.transport for s in pipeline.stages if isinstance(s, RemoteStage)] == [expected_transport]
    finally:
        pipeline.close()


def test_fast_path_refuses_a_wrong_cluster_key(secure: SecureWorkers) -> None:
    connection = WorkerConnection(secure.keyed.spec(), "right", None)
    connection.handshake()
    assert connection.data_port > 0
    with pytest.raises(ClusterError, match="cluster key rejected"):
        DataPlaneClient("127.0.0.1", connection.data_port, "wrong", None).connect(timeout=5)
    connection.close()


# ---- 5. the cluster key ----


@pytest.mark.parametrize("key", [None, "wrong"])
def test_worker_refuses_a_master_without_its_cluster_key(
    key: str | None, secure: SecureWorkers, llama: ModelSource
) -> None:
    with pytest.raises(ClusterError) as caught:
        build_pipeline(settings_for(secure.keyed, cluster_key=key), llama, "cpu")
    message = str(caught.value)
    assert secure.keyed.address in message and "--cluster-key" in message, message
    given = "no cluster key" if key is None else "a wrong cluster key"
    assert "refused" in secure.keyed.stderr and given in secure.keyed.stderr, secure.keyed.stderr


def test_worker_serves_a_master_with_its_cluster_key(
    secure: SecureWorkers, llama: ModelSource, single_node_tokens: list[int]
) -> None:
    assert_serves(settings_for(secure.keyed, cluster_key="right"), llama, single_node_tokens)


def test_keyed_workers_chain_with_the_cluster_key(
    secure: SecureWorkers, llama: ModelSource, single_node_tokens: list[int]
) -> None:
    """A worker passing hidden states to the next one presents the cluster key like a master does."""
    settings = settings_for(secure.keyed, cluster_key="right")
    settings.workers = [secure.keyed.spec((0, 2)), secure.keyed_too.spec((2, 3))]
    pipeline = build_pipeline(settings, llama, "cpu")
    try:
        assert generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT)) == single_node_tokens
        stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        assert all(stage.chained_calls == stage.stats.calls > 0 for stage in stages)
    finally:
        pipeline.close()
    assert "refused" not in secure.keyed_too.stderr


def tls_pipeline(
    certificates: Certificates,
    first: WorkerProcess,
    second: WorkerProcess,
    llama: ModelSource,
    micro_batch_tokens: int | None = None,
) -> Pipeline:
    """A TLS master (mutual: it presents its certificate) with `first` on layers 0-1 and `second` on layer 2."""
    settings = settings_for(
        first, tls_ca=certificates.ca, tls_cert=certificates.client_cert, tls_key=certificates.client_key
    )
    settings.workers = [first.spec((0, 2)), second.spec((2, 3))]
    settings.micro_batch_tokens = micro_batch_tokens
    return build_pipeline(settings, llama, "cpu")


def test_tls_workers_chain(
    secure: SecureWorkers, certificates: Certificates, llama: ModelSource, single_node_tokens: list[int]
) -> None:
    """Each worker verifies the next with its --tls-ca and presents its own certificate; the last one's answer is
    written on the master's TLS connection by that connection's own thread."""
    pipeline = tls_pipeline(certificates, secure.mutual, secure.mutual_too, llama)
    try:
        for _ in range(2):  # the second time over links and sessions already open
            assert generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT)) == single_node_tokens
        stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        assert [stage.transport for stage in stages] == ["fast+tls", "fast+tls"]
        assert all(stage.chained_calls == stage.stats.calls > 0 for stage in stages)
    finally:
        pipeline.close()


def all_logits(pipeline: Pipeline, batch: list[SequenceSlice], vocab: int) -> torch.Tensor:
    n_rows = sum(s.n_tokens for s in batch)
    ids = torch.randint(0, vocab, (n_rows,), generator=torch.Generator().manual_seed(n_rows))
    return pipeline.run(ids, batch, list(range(n_rows)))[0]


def test_a_tls_chain_takes_steps_in_pieces(
    secure: SecureWorkers, certificates: Certificates, llama: ModelSource
) -> None:
    """Pieces in flight over TLS: the master writes the first worker's connection from one thread and reads the
    others' from another, and reads the first's only once it is done writing (a worker's errors come back there;
    that no read comes sooner is tests/unit/rpc/test_chain.py's, which orders the events: here it could not show).
    Megabytes go each way, so an answer left unread would stall the whole chain."""
    steps = [
        [SequenceSlice(1, 0, 30)],  # 8 pieces of 4 rows
        [SequenceSlice(1, 30, 1), SequenceSlice(2, 10, 20, copy_from=1)],
        [SequenceSlice(seq_id, 0, 500) for seq_id in range(10, 18)],  # 1000 pieces
    ]
    local = local_pipeline(llama, torch.float32)
    want = [all_logits(local, batch, llama.config.vocab_size) for batch in steps]
    pipeline = tls_pipeline(certificates, secure.mutual, secure.mutual_too, llama, micro_batch_tokens=4)
    try:
        with pytest.raises(StageError, match="sequence 77 starts at 5"):  # the first worker refuses every piece
            pipeline.run(torch.zeros(20, dtype=torch.long), [SequenceSlice(77, 5, 20)], [19])
        for batch, expected in zip(steps, want, strict=True):
            torch.testing.assert_close(
                all_logits(pipeline, batch, llama.config.vocab_size), expected, atol=1e-4, rtol=1e-4
            )
        stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        assert [stage.transport for stage in stages] == ["fast+tls", "fast+tls"]
        assert [stage.chained_calls for stage in stages] == [7 + 5 + 1000] * 2  # the refused step counted none
        assert all(stage.healthy() and stage.chainable() for stage in stages)
    finally:
        pipeline.release([1, 2, 77, *range(10, 18)])
        pipeline.close()


def test_a_tls_worker_that_cannot_verify_the_next_answers_the_master(
    secure: SecureWorkers,
    certificates: Certificates,
    llama: ModelSource,
    single_node_tokens: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without --tls-ca a worker cannot verify the next one: it answers with its output, the master runs the rest."""
    pipeline = tls_pipeline(certificates, secure.tls, secure.mutual, llama)
    try:
        assert generate_tokens(pipeline, llama.tokenizer, llama.tokenizer.encode(PROMPT)) == single_node_tokens
        stages = [stage for stage in pipeline.stages if isinstance(stage, RemoteStage)]
        assert "cannot pass its output to 'mutual'" in caplog.text and "certificate" in caplog.text
        assert "--tls-cert without --tls-ca" in secure.tls.stderr  # it said so when it started
        assert not any(stage.chainable() for stage in stages)
        assert stages[1].chained_calls == 0 and stages[1].stats.calls > 0
    finally:
        pipeline.close()


def test_wrong_cluster_key_through_the_cli_is_one_line(secure: SecureWorkers, tiny: Path) -> None:
    flags = ("--workers", secure.keyed.address, "--cluster-key", "wrong")
    line = one_line_error(run_cake(*serve_args(tiny, *flags)))
    assert secure.keyed.address in line and "cluster key" in line, line


# ---- 6. TLS ----


def test_tls_worker_serves_a_master_that_trusts_its_ca(
    secure: SecureWorkers, certificates: Certificates, llama: ModelSource, single_node_tokens: list[int]
) -> None:
    assert "(TLS" in secure.tls.stdout
    assert_serves(settings_for(secure.tls, tls_ca=certificates.ca), llama, single_node_tokens)


def test_plaintext_master_refuses_a_tls_worker(secure: SecureWorkers, llama: ModelSource) -> None:
    with pytest.raises(ClusterError) as caught:
        build_pipeline(settings_for(secure.tls, connect_timeout=1.0), llama, "cpu")
    message = str(caught.value)
    assert secure.tls.address in message and "a TLS worker needs --tls-ca" in message, message


def test_tls_master_against_a_plaintext_worker_is_one_line(
    secure: SecureWorkers, certificates: Certificates, tiny: Path
) -> None:
    # gRPC logs every failed TLS handshake while it retries until the deadline: none of that may reach stderr.
    flags = ("--workers", secure.keyed.address, "--cluster-key", "right", "--tls-ca", str(certificates.ca))
    line = one_line_error(run_cake(*serve_args(tiny, *flags, "--connect-timeout", "1")))
    assert secure.keyed.address in line and "with TLS" in line, line


def test_master_trusting_another_ca_refuses_the_tls_worker(
    secure: SecureWorkers, certificates: Certificates, llama: ModelSource
) -> None:
    with pytest.raises(ClusterError) as caught:
        build_pipeline(settings_for(secure.tls, tls_ca=certificates.other_ca, connect_timeout=1.0), llama, "cpu")
    message = str(caught.value)
    assert secure.tls.address in message and "certificate signed by --tls-ca" in message, message
    assert "(its certificate: unable to get local issuer certificate)" in message, message  # the exact reason


def test_mutual_tls_needs_the_masters_certificate(
    secure: SecureWorkers, certificates: Certificates, llama: ModelSource, single_node_tokens: list[int]
) -> None:
    with pytest.raises(ClusterError, match="unreachable") as caught:
        build_pipeline(settings_for(secure.mutual, tls_ca=certificates.ca, connect_timeout=1.0), llama, "cpu")
    # Which side refused whom (the hint blamed the worker's certificate).
    assert "the worker refused this master's certificate: a worker started with --tls-ca" in str(caught.value)
    with_certificate = settings_for(
        secure.mutual, tls_ca=certificates.ca, tls_cert=certificates.client_cert, tls_key=certificates.client_key
    )
    assert_serves(with_certificate, llama, single_node_tokens)
