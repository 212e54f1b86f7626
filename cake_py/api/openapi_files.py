"""The OpenAPI document's part for the Files and Batch APIs (`files`, `batches`): their paths and schemas, merged
into `openapi.PATHS` and `openapi_schemas.SCHEMAS`."""

from __future__ import annotations

from typing import Any

from cake_py.api.batch_objects import ENDPOINTS
from cake_py.api.file_store import UPLOAD_PURPOSES
from cake_py.api.openapi_schemas import INT, NULL_STR, STR, obj, ref

NULL_INT = {"type": ["integer", "null"]}
LIST_PAGE = {"object": {"const": "list"}, "first_id": NULL_STR, "last_id": NULL_STR, "has_more": {"type": "boolean"}}
FILE_ID = [{"name": "file_id", "in": "path", "required": True, "schema": STR}]
BATCH_ID = [{"name": "batch_id", "in": "path", "required": True, "schema": STR}]
PAGING = [
    {"name": "limit", "in": "query", "schema": INT},
    {"name": "after", "in": "query", "schema": {**STR, "description": "the last id of the page before"}},
]

SCHEMAS: dict[str, Any] = {
    "File": obj(
        {
            "id": STR,
            "object": {"const": "file"},
            "bytes": INT,
            "created_at": INT,
            "filename": STR,
            "purpose": {"enum": [*UPLOAD_PURPOSES, "batch_output"]},
            "expires_at": NULL_INT,
            "status": {"const": "processed"},
        }
    ),
    "FileUpload": obj(
        {
            "file": {**STR, "format": "binary"},
            "purpose": {"enum": list(UPLOAD_PURPOSES)},
            "expires_after[anchor]": {"const": "created_at"},
            "expires_after[seconds]": {**INT, "minimum": 3600, "maximum": 2592000},
        },
        ("file", "purpose"),
    ),
    "FileList": obj({**LIST_PAGE, "data": {"type": "array", "items": ref("File")}}),
    "BatchCreate": obj(
        {
            "input_file_id": {**STR, "description": "a JSONL file of requests, uploaded with purpose batch"},
            "endpoint": {"enum": list(ENDPOINTS)},
            "completion_window": {"const": "24h"},
            "metadata": {"type": "object", "additionalProperties": STR, "maxProperties": 16},
        },
        ("input_file_id", "endpoint", "completion_window"),
    ),
    "Batch": obj(
        {
            "id": STR,
            "object": {"const": "batch"},
            "endpoint": STR,
            "model": STR,
            "input_file_id": STR,
            "completion_window": {"const": "24h"},
            "status": {
                "enum": [
                    "validating",
                    "failed",
                    "in_progress",
                    "finalizing",
                    "completed",
                    "expired",
                    "cancelling",
                    "cancelled",
                ]
            },
            "output_file_id": NULL_STR,
            "error_file_id": NULL_STR,
            "errors": {
                "type": ["object", "null"],
                "properties": {
                    "object": {"const": "list"},
                    "data": {
                        "type": "array",
                        "items": obj({"code": STR, "message": STR, "line": NULL_INT, "param": NULL_STR}),
                    },
                },
            },
            "request_counts": obj({"total": INT, "completed": INT, "failed": INT}),
            "usage": obj({"input_tokens": INT, "output_tokens": INT, "total_tokens": INT}),
            "metadata": {"type": ["object", "null"], "additionalProperties": STR},
            **{
                f"{when}_at": NULL_INT
                for when in (
                    "created",
                    "in_progress",
                    "expires",
                    "finalizing",
                    "completed",
                    "failed",
                    "expired",
                    "cancelling",
                    "cancelled",
                )
            },
        }
    ),
    "BatchList": obj({**LIST_PAGE, "data": {"type": "array", "items": ref("Batch")}}),
}


def paths(op: Any, json: Any) -> dict[str, dict[str, Any]]:
    """The routes, described with `openapi._op` and `openapi._json` (passed in: that module imports this one)."""
    return {
        "/v1/files": {
            "post": op(
                "Upload a file (multipart): a batch's requests as JSONL with purpose batch",
                json(ref("File")),
                body={"multipart/form-data": {"schema": ref("FileUpload")}},
                errors=(400, 401, 413),
            ),
            "get": {
                **op(
                    "Stored files (purpose, order, limit up to 10,000, after)", json(ref("FileList")), errors=(400, 401)
                ),
                "parameters": [
                    {"name": "purpose", "in": "query", "schema": STR},
                    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                    *PAGING,
                ],
            },
        },
        "/v1/files/{file_id}": {
            "get": {**op("A stored file", json(ref("File")), errors=(401, 404)), "parameters": FILE_ID},
            "delete": {
                **op(
                    "Delete a stored file",
                    json(obj({"id": STR, "object": STR, "deleted": {"type": "boolean"}})),
                    errors=(401, 404),
                ),
                "parameters": FILE_ID,
            },
        },
        "/v1/files/{file_id}/content": {
            "get": {
                **op("A stored file's bytes", {"application/octet-stream": {"schema": STR}}, errors=(401, 404)),
                "parameters": FILE_ID,
            }
        },
        "/v1/batches": {
            "post": op(
                "Run a file of requests through one endpoint, at a lower priority than interactive requests",
                json(ref("Batch")),
                body=json(ref("BatchCreate")),
                errors=(400, 401, 429),
            ),
            "get": {**op("Batches, newest first", json(ref("BatchList")), errors=(400, 401)), "parameters": PAGING},
        },
        "/v1/batches/{batch_id}": {
            "get": {
                **op("A batch: status, counts, result files", json(ref("Batch")), errors=(401, 404)),
                "parameters": BATCH_ID,
            }
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {
                **op(
                    "Cancel a batch: it ends cancelled with what was answered",
                    json(ref("Batch")),
                    errors=(400, 401, 404),
                ),
                "parameters": BATCH_ID,
            }
        },
    }
