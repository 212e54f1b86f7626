"""The names one master shows its workers under, kept for the server's life: a --workers entry takes the --name its
worker reports (where no other worker has it), and every later connection, probe and message uses that name."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports this module for ServeSettings' field
    from cake_py.config import WorkerSpec


class WorkerNames:
    """The names one master shows its workers under, for its whole life (every placement, probe and reconnect). A
    --workers entry whose reported --name a placement adopted keeps that name in what a later connection says, a
    failed one included (an error named it `worker-2` while /health said `vm:10128`), and takes the new --name of a
    worker restarted under one no other worker is shown under."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shown: dict[str, str] = {}  # address → the name it is shown under
        self._adopted: set[str] = set()  # addresses shown under the name their worker reported

    def shown(self, spec: WorkerSpec) -> WorkerSpec:
        """`spec` (as configured) under the name it is shown under now."""
        with self._lock:
            if spec.named or spec.address not in self._adopted:
                self._shown[spec.address] = spec.name
                return spec
            return replace(spec, name=self._shown[spec.address])

    def adopt(self, spec: WorkerSpec, reported: str | None) -> WorkerSpec:
        """`spec` (as configured) shown under `reported`, the name its worker gave, or under its own (None)."""
        with self._lock:
            if reported is None:
                self._adopted.discard(spec.address)
                self._shown[spec.address] = spec.name
                return spec
            self._adopted.add(spec.address)
            self._shown[spec.address] = reported
            return replace(spec, name=reported)

    def renamed(self, spec: WorkerSpec, reported: str) -> WorkerSpec | None:
        """`spec` under `reported`, the name a worker shown under its reported name gives now (it was restarted with
        another --name), unless another worker is shown under it; None: the name stays."""
        with self._lock:
            if spec.address not in self._adopted or reported in ("", "master", spec.name):
                return None
            if reported in {name for address, name in self._shown.items() if address != spec.address}:
                return None
            self._shown[spec.address] = reported
            return replace(spec, name=reported)
