"""Fixtures of the API unit tests: a served model split into several stages in this process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cake_py.api.state import ServerState
from cake_py.cluster.pipeline import Pipeline, load_ends
from cake_py.cluster.stage import LocalStage
from cake_py.config import ServeSettings
from cake_py.engine.engine import Engine
from cake_py.models.hub import resolve_model
from cake_py.models.llama import Transformer
from cake_py.models.weights import load_transformer

SplitEngine = Callable[[list[tuple[str, int, int]]], Engine]
TinyState = Callable[[Engine | None], ServerState]


@pytest.fixture
def split_engine(tiny_llama: Path) -> SplitEngine:
    """`split_engine([(name, start, end), …])` → an engine (not started) over the tiny Llama's layers cut into those
    stages, all in this process: a stage named after a worker stands in for one."""
    source = resolve_model(str(tiny_llama))

    def build(parts: list[tuple[str, int, int]]) -> Engine:
        def layers(start: int, end: int) -> Transformer:
            return load_transformer(
                source.weights, source.config, start, end, with_embedding=False, with_head=False, dtype=torch.float32
            )

        stages = [LocalStage(layers(start, end), name=name) for name, start, end in parts]
        return Engine(Pipeline(load_ends(source, torch.float32), stages), source.tokenizer)

    return build


@pytest.fixture
def tiny_state(tiny_llama: Path) -> TinyState:
    """`tiny_state(engine)` → the master's state serving `engine` as the tiny Llama (None: nothing loaded)."""

    def build(engine: Engine | None) -> ServerState:
        source = resolve_model(str(tiny_llama)) if engine is not None else None
        settings = ServeSettings(model=str(tiny_llama), dtype="float32", rate_limit=0)
        return ServerState(engine=engine, source=source, settings=settings, dtype="float32")

    return build
