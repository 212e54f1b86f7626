"""Route families by path: which error body a path answers with, which paths are rate limited, which are the UI's.

The middleware answers some requests before any route runs (401, 413, 429), so these rules are decided from the
path alone, in one place, for the middleware and the exception handlers alike.
"""

from __future__ import annotations

# Seed 000/001 routes answer errors as {"detail": …}; every other route (Cake, OpenAI) as {"error": …}.
DETAIL_PATHS = frozenset(
    {
        "/generate",
        "/chat",
        "/generate/batch",
        "/models/load",
        "/models/current",
        "/models/available",
        "/models/unload",
        "/system/info",
    }
)

# Routes that run (or would run) a model: rate limited per client.
GENERATION_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/api/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/embedding",
        "/embeddings",
        "/v1/score",
        "/score",
        "/v1/rerank",
        "/rerank",
        "/v2/rerank",
        "/reranking",
        "/v1/reranking",
        "/infill",
        "/v1/responses",
        "/v1/messages",
        "/completion",
        "/completions",
        "/generate",
        "/chat",
        "/generate/batch",
        "/v1/images/generations",
        "/api/v1/image",
        "/v1/audio/speech",
    }
)

# Routes of the web UI: behind --ui-auth (HTTP Basic), which a browser can send on its own.
UI_PATHS = frozenset({"/", "/api/v1/topology"})
UI_PREFIXES = ("/static/", "/web/")

# Never behind a key: load balancers and orchestrators probe it.
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/ping", "/version"})


def uses_detail_errors(path: str) -> bool:
    return path in DETAIL_PATHS


def uses_anthropic_errors(path: str) -> bool:
    """Anthropic's Messages API answers errors in Anthropic's shape, which its SDK reads."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def is_generation(method: str, path: str) -> bool:
    """A request that runs a model: a POST to a generation route (GET /v1/chat/completions only lists stored ones)."""
    return method == "POST" and path in GENERATION_PATHS


def is_ui(path: str) -> bool:
    return path in UI_PATHS or path.startswith(UI_PREFIXES)


def is_ui_page(path: str) -> bool:
    """The UI's page and assets (not its data): a browser loads them without an API key."""
    return path == "/" or path.startswith(UI_PREFIXES)
