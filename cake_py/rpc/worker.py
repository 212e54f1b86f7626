"""The `cake worker` process: its gRPC server and forward fast path around a WorkerServicer, the reaper of KV
caches no master released, and the run loop that ends on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc
import torch

from cake_py.cluster.hostinfo import measure_tflops
from cake_py.config import WorkerSettings
from cake_py.config_checks import check_can_listen, listen_address
from cake_py.errors import ClusterError, Stopped
from cake_py.models import graphs, kv_pool
from cake_py.models.device import pin_cpus, release_openmp_threads, resolve_device, set_threads, tune_allocator
from cake_py.rpc import MAX_MESSAGE_BYTES
from cake_py.rpc.dataplane import DataPlaneServer, server_tls
from cake_py.rpc.forward import MAX_STREAMS
from cake_py.rpc.pb import worker_pb2_grpc as pb_grpc
from cake_py.rpc.security import ClusterKeyInterceptor, server_credentials, warn_if_key_in_plaintext
from cake_py.rpc.server import WorkerServicer

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    # The worker pings its masters too: a master whose host vanished (powered off, its link cut: no reset ever
    # comes) is noticed within a minute and its streams end, an Assign's lock with them (gRPC's default: 2 hours).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    # gRPC turns SO_REUSEPORT on by default: a second worker on a busy port would then start "fine" and the kernel
    # would split masters' connections between the two. A busy port must be an error.
    ("grpc.so_reuseport", 0),
]


def start_server(settings: WorkerSettings) -> tuple[grpc.Server, WorkerServicer, int]:
    """Start serving; returns the server, its servicer and the bound port."""
    check_can_listen(settings.host, settings.port)
    set_threads(settings.threads)
    tune_allocator()
    device = resolve_device(settings.device)
    servicer = WorkerServicer(settings, device, measure_tflops(device))
    release_openmp_threads()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2 * MAX_STREAMS, thread_name_prefix="cake-worker"),
        interceptors=[ClusterKeyInterceptor(settings.cluster_key)],
        options=SERVER_OPTIONS,
    )
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    address = listen_address(settings.host, settings.port)
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_ca)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as error:
        raise ClusterError(f"cannot listen on {address}: {error}") from error
    if port == 0:
        raise ClusterError(f"cannot listen on {address}: the port is in use or the host is not local")
    if not settings.name and settings.port == 0:  # the default name names the port the OS picked, not `:0`
        servicer.name = f"{os.uname().nodename}:{port}"
    if settings.data_port >= 0:
        servicer.dataplane = DataPlaneServer(
            settings.host.strip("[]"),  # a socket binds the bare address
            settings.data_port,
            servicer.forward_frame,
            settings.cluster_key,
            server_tls(settings.tls_cert, settings.tls_key, settings.tls_ca),
            on_connection_end=release_openmp_threads,
            thread_context=torch.inference_mode,
        )
        servicer.dataplane.start()
    server.start()
    return server, servicer, port


def _reap_idle_sequences(servicer: WorkerServicer, idle_seconds: float, stop: threading.Event) -> None:
    """Free KV caches a master never released (it died, or lost the stream) once they sit idle long enough."""
    while not stop.wait(min(idle_seconds / 4, 30.0)):
        with servicer.lock:
            stale = servicer.kv.release_idle(idle_seconds) if servicer.kv is not None else []
        if stale:
            log.info("released %d sequence(s) idle for over %.0f s", len(stale), idle_seconds)


def run_worker(settings: WorkerSettings) -> None:
    pin_cpus(settings.cpus)
    graphs.set_enabled(settings.cuda_graphs)
    kv_pool.set_keep_free(settings.keep_free_bytes)
    server, servicer, port = start_server(settings)
    if not settings.cluster_key:
        log.warning("no --cluster-key: any master that can reach this worker can use it")
    # A wildcard address listens on every interface, the network's too.
    warn_if_key_in_plaintext(settings.cluster_key, bool(settings.tls_cert), [settings.host], "this worker")
    if settings.tls_cert and not settings.tls_ca:
        log.warning("--tls-cert without --tls-ca: this worker cannot verify the next worker of a chained forward, "
                    "so its output goes back through the master")  # fmt: skip
    stop = threading.Event()
    stopped_by: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():  # asked again: whatever still runs (a long cache hash, say) is not waited for
            os._exit(128 + signum)
        stopped_by.append(signum)
        stop.set()

    # Before the line that says it listens: a signal sent on reading it is a clean stop, not an interrupted start.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    tls = "TLS" if settings.tls_cert else "plaintext"
    fast = f", forward fast path on port {servicer.dataplane.port}" if servicer.dataplane else ""
    where = listen_address(settings.host, port)
    print(f"cake worker {servicer.name!r} listening on {where} ({tls}, device {servicer.device}{fast})", flush=True)
    threading.Thread(
        target=_reap_idle_sequences, args=(servicer, settings.kv_idle_seconds, stop), name="cake-reaper", daemon=True
    ).start()
    stop.wait()
    if servicer.dataplane is not None:
        servicer.dataplane.close()
    servicer.peers.close()
    server.stop(grace=1).wait()
    # A handler cancelled by the stop may still be hashing or loading gigabytes: the CLI exits without waiting for it.
    raise Stopped(stopped_by[0])
