"""Cake's image and audio routes. cake_py serves text models only, so they answer Cake's 404 JSON errors."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cake_py.api.errors import ApiError

NO_IMAGE_MODEL = "No image model loaded"
NO_AUDIO_MODEL = "No audio model loaded"


async def image_generation(request: Request) -> Response:
    raise ApiError(404, NO_IMAGE_MODEL)


async def audio_speech(request: Request) -> Response:
    raise ApiError(404, NO_AUDIO_MODEL)


ROUTES = [
    Route("/v1/images/generations", image_generation, methods=["POST"]),
    Route("/api/v1/image", image_generation, methods=["POST"]),
    Route("/v1/audio/speech", audio_speech, methods=["POST"]),
]
