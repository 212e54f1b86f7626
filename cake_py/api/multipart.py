"""Seed 000's multipart `/generate`: text (+ media) in, outputs grouped by modality out, or an NDJSON stream.

Form fields: `text`, `files`, `input_modalities`, `output_modalities`, `streaming`, `model_kwargs` (a JSON object),
`request_id`. The answer is `{request_id, outputs: {text: [{data: <base64 UTF-8>, metadata}]}}`; a stream is
`application/x-ndjson`, one object per line: `{request_id, modality: "text", data: <base64 delta>, metadata: {}}`,
and a last line with `done: true` and `metadata: {finish_reason, usage}`. The served models read and write text
only, so media in or out is a 400 naming the modality.
"""

from __future__ import annotations

import base64
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import PurePath
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cake_py.api.errors import ApiError
from cake_py.api.json_body import no_lone_surrogates, strict_loads
from cake_py.api.middleware import request_key_name
from cake_py.api.schemas import NATIVE_FIELDS, flag, native_sampling
from cake_py.api.state import ServerState
from cake_py.api.streaming import (
    EventStream,
    GenerationResponse,
    collect_all,
    event_error,
    merged,
    ndjson,
    open_streams,
    usage,
)

FORM_FIELDS = ("text", "files", "input_modalities", "output_modalities", "streaming", "model_kwargs", "request_id")
MODALITIES = ("text", "image", "audio", "video")
SERVED_MODALITIES = frozenset({"text"})
MAX_TOKEN_KEYS = ("max_output_tokens", "max_tokens", "max_new_tokens", "max_length")
KWARGS = frozenset({*NATIVE_FIELDS, *MAX_TOKEN_KEYS, "chat_template", "system"})
EXTENSIONS = {
    "image": {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"},
    "audio": {".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus", ".pcm"},
    "video": {".mp4", ".mov", ".webm", ".mkv", ".avi"},
}
MAX_FILES = 16
MAX_REQUEST_ID = 256  # characters: a uuid takes 32


def _modality_of(filename: str) -> str:
    suffix = PurePath(filename).suffix.lower()
    return next((kind for kind, suffixes in EXTENSIONS.items() if suffix in suffixes), "unknown")


def _modalities(form: FormData, key: str, default: str) -> list[str]:
    raw = form.get(key)
    if raw is None or raw == "":
        raw = default
    if not isinstance(raw, str):
        raise ApiError(400, f"{key} must be a comma-separated list, not a file upload")
    if raw.strip().lower() == "auto":  # read as the modalities are, whatever its case
        return []
    items = [item.strip().lower() for item in raw.split(",") if item.strip()]
    for item in items:
        if item not in MODALITIES:
            raise ApiError(400, f"{key}: unknown modality {item!r} (known: {', '.join(MODALITIES)})")
        if item not in SERVED_MODALITIES:
            direction = "input" if key.startswith("input") else "output"
            raise ApiError(400, f"{direction} modality {item!r} is not supported: the served model is text-only")
    return items


def _check_fields(form: FormData) -> None:
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown form field(s) {', '.join(map(repr, unknown))} (known: {', '.join(FORM_FIELDS)})")
    for key in FORM_FIELDS:
        if key != "files" and len(form.getlist(key)) > 1:
            raise ApiError(400, f"form field {key!r} is given more than once")
        if key != "files" and isinstance(form.get(key), UploadFile):
            raise ApiError(400, f"form field {key!r} must be a value, not a file upload")
    for index, item in enumerate(form.getlist("files")):
        if not isinstance(item, UploadFile):
            raise ApiError(400, f"files[{index}] must be a file upload (curl -F 'files=@path'), got {item!r}")
        modality = _modality_of(item.filename or "")
        raise ApiError(
            400, f"{modality} input {item.filename!r} is not supported: the served model is text-only (files[{index}])"
        )


def _model_kwargs(form: FormData) -> dict[str, Any]:
    raw = form.get("model_kwargs")
    if raw is None or raw == "":
        return {}
    assert isinstance(raw, str)
    try:
        kwargs = strict_loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, over-long integers, deep nesting
        raise ApiError(400, f"model_kwargs is not valid JSON ({str(error)[:200]}): {raw[:200]!r}") from None
    if not isinstance(kwargs, dict):
        raise ApiError(400, f"model_kwargs must be a JSON object, got {raw[:200]!r}")
    no_lone_surrogates(raw, kwargs, "model_kwargs")
    unknown = sorted(set(kwargs) - KWARGS)
    if unknown:
        known = ", ".join(sorted(KWARGS))
        raise ApiError(
            400, f"model_kwargs key(s) {', '.join(map(repr, unknown))} are not text-model parameters ({known})"
        )
    given = [key for key in MAX_TOKEN_KEYS if kwargs.get(key) is not None]
    if len(given) > 1:
        raise ApiError(400, f"model_kwargs gives {', '.join(given)}; give only one")
    return kwargs


def _request_id(form: FormData) -> str:
    """The client's id, or a new one. Bounded: it is echoed on every line of a stream, so a megabyte id made every
    token a megabyte to encode and send."""
    given = form.get("request_id")
    if not given:
        return uuid.uuid4().hex
    value = str(given)
    if len(value) > MAX_REQUEST_ID:
        raise ApiError(400, f"request_id has {len(value)} characters; at most {MAX_REQUEST_ID} are allowed")
    return value


def _text_flag(form: FormData, key: str, default: bool = False) -> bool:
    raw = form.get(key)
    if raw is None or raw == "":
        return default
    value = str(raw).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ApiError(400, f"{key} must be true or false, got {raw!r}"[:300])


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


async def generate_form(request: Request) -> Response:
    state: ServerState = request.app.state.cake
    engine, source = state.ready()
    max_size = state.settings.max_body_bytes or sys.maxsize  # 0: no limit, as for the body
    async with request.form(
        max_files=MAX_FILES, max_fields=len(FORM_FIELDS) + MAX_FILES, max_part_size=max_size
    ) as form:
        _check_fields(form)
        _modalities(form, "input_modalities", "auto")
        _modalities(form, "output_modalities", "text")
        text = form.get("text")
        # Streaming unless told otherwise: seed 000's examples pass streaming=false for a single JSON document.
        streaming = _text_flag(form, "streaming", default=True)
        kwargs = _model_kwargs(form)
        request_id = _request_id(form)
    if not isinstance(text, str) or not text:
        raise ApiError(400, f"text must be a non-empty prompt, got {text!r}")
    # The answer's length under whichever name was given, errors naming it (it was renamed max_length first).
    max_key = next((key for key in MAX_TOKEN_KEYS if kwargs.get(key) is not None), "max_length")
    params = native_sampling(kwargs, max_key=max_key)
    system = kwargs.get("system")
    if system is not None and not isinstance(system, str):
        raise ApiError(400, f"model_kwargs.system must be a string, got {system!r}")
    templated = flag(kwargs, "chat_template", True)
    if system and not templated:  # only the template has a place for it: it was dropped without a word
        raise ApiError(400, "model_kwargs.system needs the chat template; with chat_template false the text goes as is")
    if templated:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
        prompt_ids = await run_in_threadpool(source.tokenizer.encode_chat, messages)
    else:
        prompt_ids = await run_in_threadpool(source.tokenizer.encode, text)
    params = engine.check_prompt(len(prompt_ids), params)
    streams = open_streams(state, engine, [prompt_ids], [params], request_key_name(request))
    if streaming:
        return GenerationResponse(_ndjson_stream(request, streams, request_id), streams, "application/x-ndjson")
    (result,) = await collect_all(request, streams)
    metadata = {
        "finish_reason": result.last.finish_reason,
        "usage": usage(len(prompt_ids), result.last.completion_tokens),
        "model": state.model_name,
    }
    return JSONResponse(
        {"request_id": request_id, "outputs": {"text": [{"data": _b64(result.text), "metadata": metadata}]}}
    )


async def _ndjson_stream(request: Request, streams: list[EventStream], request_id: str) -> AsyncIterator[str]:
    async for _, event in merged(streams):
        if event.error:
            yield ndjson({"request_id": request_id, "error": event_error(event, request.url.path).message})
            return
        if event.text:
            yield ndjson({"request_id": request_id, "modality": "text", "data": _b64(event.text), "metadata": {}})
        if event.finished:
            metadata = {
                "finish_reason": "stop" if event.finish_reason == "cancelled" else event.finish_reason,
                "usage": usage(event.prompt_tokens, event.completion_tokens),
            }
            yield ndjson({"request_id": request_id, "modality": "text", "data": "", "metadata": metadata, "done": True})
