"""What every route needs: the engine serving the current model, its source and name, and the settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cake_py.config import ServeSettings
from cake_py.engine.engine import Engine
from cake_py.models.hub import ModelSource


@dataclass
class ServerState:
    engine: Engine | None
    source: ModelSource | None
    settings: ServeSettings
    dtype: str = "bfloat16"
    device: str = "cpu"
    tflops: float = 0.0  # measured once at startup: measuring runs torch, which never runs on the event loop
    started: float = field(default_factory=time.time)

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        return self.source.model_id if self.source else "none"
