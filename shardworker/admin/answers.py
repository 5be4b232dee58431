"""JSON answers of the admin listener: one body shape for every error.

``{"error": phrase, "field": name or null, "message": text}``; orjson, as the CLI prints,
so the API and the CLI give byte-identical bodies.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from starlette.responses import Response


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers={"cache-control": "no-store",
                    **(headers or {})}, media_type="application/json")  # fmt: skip


def error_response(status: int, message: str, field: str | None = None) -> Response:
    phrase = HTTPStatus(status).phrase.lower()
    return json_response(status, {"error": phrase, "field": field, "message": message})
