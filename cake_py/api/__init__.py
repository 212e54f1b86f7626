"""The HTTP surface of the master: Starlette app factory, routes per surface, schemas, SSE/NDJSON streaming."""
