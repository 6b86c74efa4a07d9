"""Errors: one exception type for handlers, and the single translation of database errors.

RPCs raise ``SQLSTATE 'PTxyz'`` (PostgREST's convention: HTTP status xyz) with a human
message and a JSON ``detail`` holding a stable ``error`` code plus useful fields. Everything
a handler or the database can raise becomes a 4xx/5xx JSON body here, nowhere else.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg import errors as pgerr

_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    402: "insufficient_credits",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "payload_too_large",
    422: "unprocessable",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answer: HTTP ``status``, stable ``code``, human ``message``, extra fields."""

    def __init__(self, status: int, code: str, message: str, /, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.fields}


def refusal(result: dict[str, Any]) -> ApiError | None:
    """An RPC's committed refusal (``{"error": ..., "message": ...}``, e.g. a spend limit) as the 402 it is, else
    None. The RPC returned it rather than raising, so what it recorded (an audit event) commits with the request."""
    if "error" not in result:
        return None
    body = dict(result)
    code = str(body.pop("error"))
    message = str(body.pop("message", code))
    return ApiError(402, code, message, **body)


def _detail_fields(detail: str | None) -> dict[str, Any]:
    if not detail:
        return {}
    try:
        parsed = json.loads(detail)
    except ValueError:
        return {"detail": detail}
    return parsed if isinstance(parsed, dict) else {"detail": parsed}


def from_database(exc: psycopg.Error) -> ApiError:
    """Translate a database error into the answer the client gets."""
    diag = exc.diag
    state = diag.sqlstate or ""
    message = diag.message_primary or str(exc).strip()
    if state.startswith("PT") and state[2:].isdigit():
        status = int(state[2:])
        fields = _detail_fields(diag.message_detail)
        code = str(fields.pop("error", _DEFAULT_CODES.get(status, "error")))
        return ApiError(status, code, message, **fields)
    if isinstance(exc, pgerr.InsufficientPrivilege):
        return ApiError(403, "forbidden", "You are not allowed to do that.")
    if isinstance(exc, pgerr.UniqueViolation):
        return ApiError(409, "conflict", f"Already exists ({diag.constraint_name}).",
                        constraint=diag.constraint_name)
    if isinstance(exc, pgerr.CheckViolation | pgerr.NotNullViolation | pgerr.ForeignKeyViolation):
        return ApiError(400, "invalid", f"Rejected by the database ({diag.constraint_name}).",
                        constraint=diag.constraint_name)
    if isinstance(exc, pgerr.DataError):
        return ApiError(400, "invalid", message)
    if isinstance(exc, pgerr.QueryCanceled):
        return ApiError(503, "timeout", "The database took too long; try again.")
    if isinstance(exc, pgerr.SerializationFailure | pgerr.DeadlockDetected):
        return ApiError(503, "retry", "A concurrent change got in the way; try again.")
    if isinstance(exc, psycopg.OperationalError):
        return ApiError(503, "database_unavailable", "The database is unreachable.")
    return ApiError(500, "internal", "Unexpected database error.")
