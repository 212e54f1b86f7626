"""GET /system/info (seed 001): the master's CPU, RAM, accelerator and versions, and every stage's node.

Remote stages describe their worker (host facts from its handshake, status, latency). Reading host facts touches
torch (accelerator memory), so the document is built in a worker thread.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from typing import Any

import psutil
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.management import current_model
from cake_py.api.state import ServerState
from cake_py.cluster.hostinfo import cpu_model, host_facts
from cake_py.errors import CakeError
from cake_py.host_memory import host_memory
from cake_py.rpc.stage_description import host_details

PROBE_TIMEOUT_S = 2.0  # a worker's handshake when no model is loaded (none is connected)
PACKAGES = ("torch", "starlette", "uvicorn", "grpcio", "tokenizers", "prometheus-client")


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("cake_py", *PACKAGES):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _master(state: ServerState) -> dict[str, Any]:
    total, available = host_memory()  # RAM within a container's limit
    process = psutil.Process()
    return {
        **host_facts(state.device, state.tflops).as_dict(),
        "cpu_model": cpu_model(),
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "ram_available_bytes": available,
        "ram_used_percent": round(100 * (1 - available / total), 1) if total else None,
        "process_rss_bytes": int(process.memory_info().rss),
        "uptime_seconds": round(time.time() - state.started, 1),
        "versions": _versions(),
    }


def _stage(stage: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": stage.name, "layers": [stage.start, stage.end]}
    host = getattr(getattr(stage, "connection", None), "host", None)
    if host is not None:
        entry.update(host_details(host))
    try:
        entry.update(stage.describe())
        entry["healthy"] = bool(stage.healthy())
    except CakeError as error:  # a worker that cannot be reached is reported, not fatal
        entry.update({"healthy": False, "status": "down", "error": str(error)})
    return entry


def system_info_document(state: ServerState) -> dict[str, Any]:
    engine = state.engine
    if engine is not None:
        stages = [_stage(stage) for stage in engine.pipeline.stages]
    else:  # no model loaded: the workers still run, asked directly (with their host facts) rather than left out
        from cake_py.cluster.master import probe_workers

        stages = state.worker_probes.get(lambda: probe_workers(state.settings, PROBE_TIMEOUT_S))
    return {
        "master": _master(state),
        "workers": [stage for stage in stages if not stage.get("local")],
        "stages": stages,
        "model": current_model(state),
    }


async def system_info(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(system_info_document, request.app.state.cake))


ROUTES = [Route("/system/info", system_info, methods=["GET"])]
