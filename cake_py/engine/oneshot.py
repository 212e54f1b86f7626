"""`cake run`: one prompt through a local engine, streamed to a text sink."""

from __future__ import annotations

from collections.abc import Callable

from cake_py.cluster.pipeline import local_pipeline
from cake_py.engine.engine import Engine
from cake_py.errors import CakeError, ConfigError
from cake_py.models import graphs
from cake_py.models.device import release_openmp_threads, resolve_device, set_threads, torch_dtype
from cake_py.models.hub import resolve_model
from cake_py.models.sampling import SamplingParams


def run_prompt(
    model: str | None,
    prompt: str,
    params: SamplingParams,
    write: Callable[[str], None],
    *,
    dtype: str = "bfloat16",
    device: str = "auto",
    raw: bool = False,
    cuda_graphs: bool = True,
    speculative_tokens: int = 0,
    chat_template: str | None = None,
    threads: int | None = None,
) -> str:
    """Generate an answer to `prompt` (chat-templated unless `raw`), writing text as it streams; returns it."""
    if raw and chat_template is not None:  # the template would go unused without a word
        raise ConfigError("--raw sends PROMPT without a chat template, so --chat-template has no use: drop one of them")
    set_threads(threads)
    graphs.set_enabled(cuda_graphs)
    source = resolve_model(model)
    tokenizer = source.tokenizer
    if chat_template is not None:
        tokenizer.set_chat_template(chat_template)
    prompt_ids = tokenizer.encode(prompt) if raw else tokenizer.encode_chat([{"role": "user", "content": prompt}])
    pipeline = local_pipeline(source, torch_dtype(dtype), resolve_device(device))
    engine = Engine(pipeline, tokenizer, speculative_tokens=speculative_tokens)
    release_openmp_threads()  # loading ran here; the engine thread must own the only OpenMP pool
    engine.start()
    pieces = []
    try:
        for event in engine.generate(prompt_ids, params):
            if event.error:
                raise CakeError(event.error)
            if event.text:
                write(event.text)
                pieces.append(event.text)
    finally:
        engine.stop()
    return "".join(pieces)
