"""GET /api/v1/topology: answered from the event loop without touching torch, so it works mid-generation; with no
model served (none loaded, or a switch under way) it still lists the master and the workers, as they are now."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cake_py.api.failover import left_out
from cake_py.api.state import NO_TEXT_MODEL, ServerState
from cake_py.api.system import PROBE_TIMEOUT_S
from cake_py.cluster.hostinfo import host_facts
from cake_py.cluster.topology import build_topology, layer_names, master_node
from cake_py.engine.faults import ENGINE_DEAD


def live_figures(state: ServerState) -> dict[str, object]:
    engine, retired = state.counted  # together: see ServerState.counted
    if engine is None:
        return {}
    stats = engine.stats
    # Read fresh from the engine: stats.running/waiting and the rate are only updated by steps, so they go stale
    # (and would show a busy cluster) as soon as the engine goes idle.
    in_flight = engine.in_flight
    return {
        "tokens_per_second": round(engine.tokens_per_second(), 2),
        "requests_in_flight": in_flight,
        "queue_depth": engine.queue_depth,
        # For the process, like /metrics' counters: what the engines this one replaced counted too.
        "requests_total": retired.requests + stats.requests_total,
        "tokens_generated": retired.generated_tokens + stats.tokens_generated,
        "last_step_ms": round(stats.last_step_ms, 3),
    }


def topology_document(state: ServerState) -> dict[str, Any]:
    """The topology now; run off the event loop (host facts may ask the accelerator, and with no model served the
    workers are asked). `state` says what is served: "serving" (Cake's document), "switching" (a /models/load, an
    unload or a failover placement runs) or "no_model" (none loaded, or a failed load's restore still waits)."""
    switching = state.switching
    engine, source = state.engine, state.source  # read once: a switch may replace them while this runs
    if switching is not None or engine is None or source is None:
        return unserved_document(state, switching)
    document = build_topology(
        source,
        state.model_name,
        state.dtype,
        engine.pipeline,
        host_facts(state.device, state.tflops),
        live_figures(state),
        master_error=ENGINE_DEAD if engine.died else None,
    )
    document = {"state": "serving", "reason": None, **document}
    if state.failover is not None:  # workers a failover placement goes without: not stages of the pipeline
        document["left_out"] = left_out(state)
    return document


def unserved_document(state: ServerState, switching: str | None) -> dict[str, Any]:
    """No model served: the master and every configured worker, each asked now (as /system/info asks them), so the
    cluster view shows who is up when it matters most (a load failed, or a failover placement runs, because a
    worker froze). The model's fields are null and its layers empty; `reason` says why nothing is served."""
    from cake_py.cluster.master import probe_workers  # the cluster side, imported on first use (as system.py does)

    if switching is not None:
        reason = f"the server is {switching}"
    else:
        reason = state.restore_error or f"{NO_TEXT_MODEL}: load one with POST /models/load"
    workers = []
    for node in state.worker_probes.get(lambda: probe_workers(state.settings, PROBE_TIMEOUT_S)):
        held = node.pop("layers")  # [start, end) of a model this master does not serve: another's, or one let go
        if held is not None:
            node["held_layers"] = layer_names(*held)
        node.pop("healthy", None)
        workers.append({**node, "status": "down" if node["status"] == "down" else "up", "layers": []})
    document: dict[str, Any] = {
        "state": "switching" if switching is not None else "no_model",
        "reason": reason,
        "model": None,
        "model_id": None,
        "dtype": state.dtype,
        "num_layers": None,
        "memory_bytes": None,
        "layer_size_bytes": None,
        "master": master_node(host_facts(state.device, state.tflops), []),
        "workers": workers,
        "layer_details": {},
        "live": live_figures(state),
    }
    if state.failover is not None:
        document["left_out"] = left_out(state)
    return document


async def topology(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(topology_document, request.app.state.cake))


ROUTES = [Route("/api/v1/topology", topology, methods=["GET"])]
