"""Failover (`cake serve --failover-after S`): when a worker's stage has been down for S seconds, the model is placed
again over the workers that still answer (and the master), so the cluster serves without it; once a left-out
worker answers again and nothing is being generated, the configured cluster is placed again (fail-back).

Each is a model switch as /models/load makes one (management.py): the old engine stops (its requests had already
failed with the stage), its layers are freed, the new placement is streamed (from the workers' disk caches where
they hold the weights), and requests meanwhile get a 503 with Retry-After naming why. Manual layer ranges assume
every configured worker, so a placement without one is automatic. A placement that cannot be made (the model fits
on none of what is left, a worker failing meanwhile) is tried again every few seconds; until then requests get the
503, and /health says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

from starlette.concurrency import run_in_threadpool

from cake_py.api.management import build_engine, retire
from cake_py.api.state import ServerState
from cake_py.cluster.master import answering_workers
from cake_py.config import WorkerSpec
from cake_py.models.device import release_device_memory
from cake_py.models.hub import ModelSource

log = logging.getLogger(__name__)

CHECK_S = 1.0  # how often the pipeline's stages are looked at (cheap: each keeps its own state)
PROBE_S = 5.0  # how often left-out workers are asked whether they are back, and a failed placement tried again
PROBE_TIMEOUT_S = 2.0


class Failover:
    def __init__(self, state: ServerState, after_s: float) -> None:
        self.state, self.after_s = state, after_s
        self.configured = list(state.settings.workers)  # the cluster as started: what fail-back restores
        self.left_out: set[str] = set()  # addresses of configured workers the current placement goes without
        self.down_since: dict[str, float] = {}
        self.waiting: str | None = None  # why the last placement failed: nothing is served until one succeeds
        self.source: ModelSource | None = state.source
        self._probed = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="cake-failover")

    def stop_soon(self) -> None:
        """No placement starts after this (a shutdown); one under way is cancelled where it awaits."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                await self.check()
            except Exception:  # a bug must not end the watch: the next check tries again
                log.exception("failover check failed")

    async def check(self) -> None:
        state, now = self.state, time.monotonic()
        if state.switch_lock.locked():
            return
        engine = state.engine
        if engine is None:
            if self.waiting is not None and now - self._probed >= PROBE_S:
                await self.place()
            return
        self.source = state.source
        down = engine.pipeline.down_workers()
        self.down_since = {address: self.down_since.get(address, now) for address in down}
        if any(now - since >= self.after_s for since in self.down_since.values()):
            await self.place()
        elif self.left_out and not down and engine.in_flight == 0 and now - self._probed >= PROBE_S:
            self._probed = now
            missing = [spec for spec in self.configured if spec.address in self.left_out]
            if await run_in_threadpool(answering_workers, state.settings, missing, PROBE_TIMEOUT_S):
                await self.place()

    async def place(self) -> None:
        """Place the model over the configured workers that answer now (all of them: the cluster as configured)."""
        state = self.state
        source = self.source
        if source is None:  # unloaded meanwhile: nothing to place
            self.waiting = None
            return
        async with state.switch_lock:
            self._probed = time.monotonic()
            answering = await run_in_threadpool(answering_workers, state.settings, self.configured, PROBE_TIMEOUT_S)
            left_out = {spec.address for spec in self.configured} - answering
            workers = [spec for spec in self.configured if spec.address in answering]
            if left_out:
                workers = [replace(spec, layers=None) for spec in workers]
            settings = replace(state.settings, workers=workers)
            why = f"without {_names(self.configured, left_out)}" if left_out else "over every configured worker"
            state.switching = f"placing {source.model_id!r} again {why}"
            log.warning("failover: %s", state.switching)
            old, state.engine = state.engine, None
            try:
                await run_in_threadpool(retire, old)
                old = None
                await run_in_threadpool(release_device_memory, state.device)
                engine = await run_in_threadpool(build_engine, state, source, settings)
            except Exception as error:
                self.waiting = f"{source.model_id!r} could not be placed {why}: {error}"
                state.switching = f"waiting to place {self.waiting}; retrying every {PROBE_S:.0f} s"
                log.error("failover: %s", self.waiting)
                return
            state.engine, state.source, state.settings = engine, source, settings
            state.switching, self.waiting = None, None
            self.left_out, self.down_since = left_out, {}
            log.warning("failover: %r is served %s", source.model_id, why)


def left_out(state: ServerState) -> list[dict[str, str]]:
    """The configured workers the served placement goes without (for /health and the topology)."""
    failover = state.failover
    if failover is None:
        return []
    reason = "down; the model was placed without it, and takes it back once it answers and nothing is generating"
    return [
        {"name": spec.name, "host": spec.address, "reason": reason}
        for spec in failover.configured
        if spec.address in failover.left_out
    ]


def _names(workers: list[WorkerSpec], addresses: set[str]) -> str:
    return ", ".join(f"{spec.name} ({spec.address})" for spec in workers if spec.address in addresses)
