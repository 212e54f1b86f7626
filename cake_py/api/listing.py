"""OpenAI's cursor listing, shared by its list routes: `order`, `limit`, `after` (an id) in the query, and the
`{"object": "list", "data", "first_id", "last_id", "has_more"}` page."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from starlette.datastructures import QueryParams

from cake_py.api.errors import ApiError


def list_page(
    query: QueryParams,
    items: Sequence[dict[str, Any]],
    *,
    what: str,
    default_limit: int = 20,
    max_limit: int = 100,
    ordered: bool = True,
    default_order: str = "desc",
    cursor: Callable[[str], int | None] | None = None,
) -> dict[str, Any]:
    """The page of `items` (oldest first) the query asks for; `ordered` False: no `order` (newest first always).
    An `after` no longer among the items (deleted since the last page) is placed by `cursor`: how many of the
    items were made before it. A bad order or limit, or an `after` that names none of `what`, is a 400."""
    order = query.get("order", default_order) if ordered else "desc"
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order must be asc or desc, got {order!r}"[:300])
    try:
        limit = int(query.get("limit", str(default_limit)))
    except ValueError:
        limit = 0
    if not 1 <= limit <= max_limit:
        raise ApiError(400, f"limit must be an integer from 1 to {max_limit}, got {query.get('limit')!r}"[:300])
    rows = list(reversed(items) if order == "desc" else items)
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in rows]
        if after in ids:
            rows = rows[ids.index(after) + 1 :]
        elif (before := cursor(after) if cursor is not None else None) is not None:
            rows = list(reversed(items[:before]) if order == "desc" else items[before:])
        else:
            raise ApiError(400, f"after: no {what} has the id {after!r}"[:300])
    page = rows[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(rows) > limit,
    }
