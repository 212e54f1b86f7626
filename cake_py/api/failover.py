"""Failover (`cake serve --failover-after S`): when a worker's stage has been down for S seconds, the model is placed
again over the workers that still answer, so the cluster serves without it (with no worker left, the master takes
every layer if its free memory holds them); once a left-out worker has answered for a while and nothing is being
generated, the configured cluster is placed again (fail-back).

Each is a model switch as /models/load makes one (management.py): the old engine stops, its layers are freed, the
new placement is streamed (from the workers' disk caches where they hold the weights), and new requests meanwhile
get a 503 with Retry-After naming why. Requests in flight are handed over (the engine held them while the stage was
down): the new engine computes them again from their first token, and their streams go on. Manual layer ranges assume
every configured worker, so a placement without one is automatic. A worker another master is using is not taken
(as a reconnecting stage does not take it). A placement that fails falls back to the last one that worked, and the
workers it added are left out for a while (doubling, to 5 minutes); when none can be made (the model fits on none
of what is left) it is tried again every few seconds, and requests get the 503 and /health the reason meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace

from starlette.concurrency import run_in_threadpool

from cake_py.api.management import build_engine, retire
from cake_py.api.state import ServerState
from cake_py.cluster.master import assignments_of, available_workers, check_master_holds_all
from cake_py.config import ServeSettings
from cake_py.engine.engine import ENGINE_STOPPED, Engine
from cake_py.engine.sequence import GenerationEvent, Sequence
from cake_py.errors import ClusterError
from cake_py.models.device import release_device_memory, torch_dtype
from cake_py.models.hub import ModelSource

log = logging.getLogger(__name__)

CHECK_S = 1.0  # how often the pipeline's stages are looked at (cheap: each keeps its own state)
PROBE_S = 5.0  # how often left-out workers are asked whether they are back, and a failed placement tried again
PROBE_TIMEOUT_S = 2.0
BACK_FOR_S = 15.0  # a left-out worker is taken back once it has answered every probe for this long
HOLD_OFF_S, MAX_HOLD_OFF_S = 30.0, 300.0  # a worker whose placement failed is left out this long, doubling
STOP_WAIT_S = 60.0  # a shutdown waits this long for a placement under way (its engine is then closed, not leaked)


class Failover:
    def __init__(self, state: ServerState, after_s: float) -> None:
        self.state, self.after_s = state, after_s
        self.configured = list(state.settings.workers)  # the cluster as started: what fail-back restores
        self.names = {spec.address: spec.name for spec in self.configured}  # as the pipeline shows them
        self.working = {spec.address for spec in self.configured}  # the workers of the last placement that worked
        self.left_out: set[str] = set()  # addresses of configured workers the current placement goes without
        self.down_since: dict[str, float] = {}
        self.back_since: dict[str, float] = {}  # left-out workers answering since
        self.held_off: dict[str, tuple[float, float]] = {}  # address → (until, the next hold-off)
        self.waiting: str | None = None  # why the last placement failed: nothing is served until one succeeds
        self.source: ModelSource | None = state.source
        self.stopping = False
        self.handed: list[Sequence] = []  # requests in flight while a placement is made, for its new engine
        self._probed = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="cake-failover")

    def stop_soon(self) -> None:
        """No placement starts after this (a shutdown); one under way finishes and closes what it built. Requests
        waiting for it end now, while their clients are still there to hear it."""
        self.stopping = True
        handed, self.handed = self.handed, []
        _end(handed, ClusterError(ENGINE_STOPPED))

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, STOP_WAIT_S)
            except (TimeoutError, asyncio.CancelledError):
                pass

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(CHECK_S)
            try:
                await self.check()
            except Exception:  # a bug must not end the watch: the next check tries again
                log.exception("failover check failed")

    async def check(self) -> None:
        state, now = self.state, time.monotonic()
        if state.switch_lock.locked() or self.stopping:
            return
        engine = state.engine
        if engine is None:
            if self.waiting is not None and now - self._probed >= PROBE_S:
                await self.place(None)
            return
        self.waiting = None  # serving (a placement of ours, or a /models/load since)
        self.source = state.source
        for stage in engine.pipeline.stages:
            if stage.address is not None:
                self.names[stage.address] = stage.name
        state.placed |= assignments_of(engine.pipeline)  # a stage that reconnected re-assigned its worker
        down = engine.pipeline.down_workers()
        self.down_since = {address: self.down_since.get(address, now) for address in down}
        if any(now - since >= self.after_s for since in self.down_since.values()):
            await self.place(engine)
        elif self.left_out and not down and now - self._probed >= PROBE_S:
            self._probed = now
            held = {address for address, (until, _) in self.held_off.items() if until > now}
            missing = [spec for spec in self.configured if spec.address in self.left_out - held]
            back = await run_in_threadpool(
                available_workers, state.settings, missing, PROBE_TIMEOUT_S, None, state.placed
            )
            self.back_since = {address: self.back_since.get(address, now) for address in back}
            if any(now - since >= BACK_FOR_S for since in self.back_since.values()) and self._idle(engine):
                await self.place(engine)

    def _idle(self, engine: Engine) -> bool:
        return engine.in_flight == 0 and engine.queue_depth == 0

    async def place(self, expected: Engine | None) -> None:
        """Place the model over the configured workers a placement may take now; `expected` is the engine the
        check saw (a load or unload since then wins: nothing is done)."""
        state = self.state
        async with state.switch_lock:
            source = state.source if expected is not None else self.source
            if state.engine is not expected or source is None or self.stopping:
                return
            self._probed = time.monotonic()
            try:
                pipeline = expected.pipeline if expected is not None else None
                answering = await run_in_threadpool(
                    available_workers, state.settings, self.configured, PROBE_TIMEOUT_S, pipeline, state.placed
                )
            except Exception as error:  # credentials that cannot be read, say: said, then tried again later
                log.error("failover: the workers could not be asked: %s", error)
                if expected is None:  # nothing is served meanwhile: say why
                    self._wait(source, f"the workers could not be asked: {error}")
                return
            now = time.monotonic()
            held = {address for address, (until, _) in self.held_off.items() if until > now}
            attempts = [answering - held]
            if self.working & answering not in attempts:
                attempts.append(self.working & answering)  # the last placement that worked, if this one fails
            if expected is not None and state.engine is expected and not self.down_since:  # a fail-back
                state.switching = f"placing {source.model_id!r} again over every configured worker"
                if not self._idle(expected):  # a request came during the probes: it is not cut, this waits
                    state.switching = None
                    return
            old, state.engine = state.engine, None
            # Requests in flight wait for the new placement and go on there, computed again from their first token.
            self.handed = await run_in_threadpool(_hand_over, old) if old is not None else []
            state.recount(old)
            reasons: list[str] = []
            try:
                for workers in attempts:
                    engine, reason = await self._build(source, workers)
                    if engine is not None:
                        handed, self.handed = self.handed, []
                        if handed:
                            log.warning("failover: %d request(s) in flight go on over the new placement", len(handed))
                            _adopt(engine, handed, old)
                        return
                    reasons.append(reason)
                    if self.stopping:
                        break
                    for address in workers - self.working:  # the workers this attempt added: left out for a while
                        _, hold = self.held_off.get(address, (0.0, HOLD_OFF_S))
                        self.held_off[address] = (time.monotonic() + hold, min(hold * 2, MAX_HOLD_OFF_S))
                self._wait(source, "; ".join(reasons))
            finally:  # no placement took them (it failed, the server is stopping, or this was cancelled): they end
                why = "; ".join(reasons) or "the server is stopping"
                handed, self.handed = self.handed, []
                _end(handed, ClusterError(f"{source.model_id!r} could not be placed again: {why}"))

    async def _build(self, source: ModelSource, workers: set[str]) -> tuple[Engine | None, str]:
        """Serve `source` over `workers` (addresses); (the engine, "") or (None, why not)."""
        state = self.state
        left_out = {spec.address for spec in self.configured} - workers
        specs = [spec for spec in self.configured if spec.address in workers]
        if left_out:
            specs = [replace(spec, layers=None) for spec in specs]
        settings = replace(state.settings, workers=specs)
        why = f"without {self.describe(left_out)}" if left_out else "over every configured worker"
        state.switching = f"placing {source.model_id!r} again {why}"
        log.warning("failover: %s", state.switching)
        await run_in_threadpool(release_device_memory, state.device)
        built = asyncio.ensure_future(run_in_threadpool(self._build_engine, source, settings))
        try:
            engine = await asyncio.shield(built)  # a shutdown meanwhile: the build ends, then its engine is closed
        except asyncio.CancelledError:
            built.add_done_callback(lambda done: _close_later(done))
            raise
        except Exception as error:
            log.error("failover: %r could not be placed %s: %s", source.model_id, why, error)
            return None, f"{source.model_id!r} could not be placed {why}: {error}"
        if self.stopping:
            await run_in_threadpool(retire, engine)
            return None, "the server is stopping"
        state.engine, state.source, state.settings = engine, source, settings
        state.switching, self.waiting = None, None
        self.working, self.left_out = workers, left_out
        self.down_since, self.back_since = {}, {}
        log.warning("failover: %r is served %s", source.model_id, why)
        return engine, ""

    def load_settings(self, settings: ServeSettings) -> tuple[ServeSettings, set[str]]:
        """(Blocking: asks the workers.) The settings a /models/load places `settings`'s model with: over the
        configured workers that answer now (all of them: the configured cluster, manual layers included; some:
        automatic over those), and the addresses left out. A load is not held off by an earlier failed placement."""
        answering = available_workers(settings, self.configured, PROBE_TIMEOUT_S, None, self.state.placed)
        left_out = {spec.address for spec in self.configured} - answering
        specs = [spec for spec in self.configured if spec.address in answering]
        if left_out:
            specs = [replace(spec, layers=None) for spec in specs]
        return replace(settings, workers=specs), left_out

    def loaded(self, settings: ServeSettings, left_out: set[str]) -> None:
        """A /models/load placed the model over `settings.workers`: fail-back restores the configured cluster from
        there, as after a placement of its own."""
        self.working = {spec.address for spec in settings.workers}
        self.left_out, self.waiting = left_out, None
        self.down_since, self.back_since, self.held_off = {}, {}, {}

    def _build_engine(self, source: ModelSource, settings: ServeSettings) -> Engine:
        if not settings.workers:  # every layer here: only if this process's memory holds them
            check_master_holds_all(source, torch_dtype(self.state.settings.dtype), self.state.device)
        return build_engine(self.state, source, settings)

    def _wait(self, source: ModelSource, why: str) -> None:
        self.waiting = why
        self.state.switching = f"waiting to place {why}; retrying every {PROBE_S:.0f} s"

    def describe(self, addresses: set[str]) -> str:
        return ", ".join(f"{self.names.get(address, address)} ({address})" for address in sorted(addresses))


def _hand_over(engine: Engine) -> list[Sequence]:
    """Stop the engine, keeping its unfinished sequences for the next one, and free its layers on every stage."""
    sequences = engine.hand_over()
    engine.close()
    return sequences


def _adopt(engine: Engine, sequences: list[Sequence], predecessor: Engine | None) -> None:
    try:
        engine.adopt(sequences, predecessor)
    except ClusterError as error:  # stopping already (a shutdown)
        _end(sequences, error)


def _end(sequences: list[Sequence], error: ClusterError) -> None:
    """Handed-over sequences no engine will take: each request ends with `error`."""
    for seq in sequences:
        try:
            seq.sink(GenerationEvent(seq.seq_id, finish_reason="error", error=str(error), exception=error))
        except Exception:
            log.exception("event sink of sequence %d failed", seq.seq_id)


def _close_later(done: asyncio.Future[Engine]) -> None:
    """An engine built after its placement was cancelled: closed in a thread (closing joins threads), not served."""
    if not done.cancelled() and done.exception() is None:
        threading.Thread(target=retire, args=(done.result(),), name="cake-failover-close", daemon=True).start()


def left_out(state: ServerState) -> list[dict[str, str]]:
    """The configured workers the served placement goes without (for /health and the topology)."""
    failover = state.failover
    if failover is None:
        return []
    reason = "down; the model was placed without it, and takes it back once it answers and nothing is generating"
    return [
        {"name": failover.names.get(spec.address, spec.name), "host": spec.address, "reason": reason}
        for spec in failover.configured
        if spec.address in failover.left_out
    ]
