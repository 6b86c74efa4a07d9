"""The wire: bounded request bodies, JSON answers in the one encoding, and every error as JSON.

Request bodies are untrusted and unbounded on the wire (``Transfer-Encoding: chunked`` has no
length up front), so they are read in one place only, ``read_body``, which stops at
``MAX_BODY_BYTES``. Whatever goes wrong while answering becomes an ``ApiError`` in
``api_error`` and ``{"error": code, "message": ..., ...}`` in ``error_response``, nowhere
else; a 500 never carries a traceback.
"""

from __future__ import annotations

import io
import logging
import socket
from typing import Any, TypeVar

import flask
import psycopg
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from .encoding import dumps
from .errors import ApiError, from_database

log = logging.getLogger("upshift.request")
BaseModelT = TypeVar("BaseModelT", bound=BaseModel)
MAX_BODY_BYTES = 2 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024


def too_large() -> ApiError:
    return ApiError(413, "payload_too_large", f"The request body is larger than {MAX_BODY_BYTES} bytes.")


def read_body(request: flask.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, read from ``request.stream`` in bounded chunks; more than ``limit`` is a 413.

    This relies neither on ``Content-Length`` (a chunked body has none) nor on Flask's
    ``MAX_CONTENT_LENGTH`` (functions-framework builds its own Flask app without it): at most
    ``limit`` + 1 bytes are ever buffered, whatever the client sends.
    """
    if request.content_length is not None and request.content_length > limit:
        raise too_large()
    stream = request.stream
    buf = bytearray()
    while len(buf) <= limit:
        chunk = _read(stream, min(READ_CHUNK_BYTES, limit + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise too_large()


def _read(stream: Any, size: int) -> bytes:
    try:
        return bytes(stream.read(size))
    except RequestEntityTooLarge:  # Flask's MAX_CONTENT_LENGTH, where it is set, tripped first
        raise too_large() from None
    except Exception as exc:  # whatever the server's stream raises: the client went away or sent a bad chunk
        log.warning("request body unreadable: %s", type(exc).__name__)
        raise ApiError(400, "unreadable_body",
                       f"The request body could not be read ({type(exc).__name__}).") from None


class ClientGone(ApiError):
    """The client hung up before its request was started: nothing is done for it (logged as 499)."""

    def __init__(self) -> None:
        super().__init__(499, "client_closed_request", "The client closed the connection before the request began.")


def client_gone(request: flask.Request) -> bool:
    """Has the client closed its connection? Checked once the request is read, before any database work.

    Only where the server hands us the socket (gunicorn's ``gunicorn.socket``): a peek that finds the
    end of the stream means the client sent its request and hung up (it waited too long in a queue,
    say). Data still unread (a pipelined request) or nothing yet both mean it is still there.
    """
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"")
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset by the peer


def abandon_body(request: flask.Request) -> None:
    """Once the Router has answered, nobody reads the rest of the body.

    functions-framework registers an ``after_request`` hook that calls ``request.get_data()`` on every
    non-streamed response ("read the entire request before responding"). Unbounded, that would
    buffer in memory whatever the Router refused (a 413) or never read (a 401): an empty stream takes
    the body's place. What the handler read stays available as ``Ctx.raw_body()``.
    """
    request.stream = io.BytesIO()


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("events", 0, "event_type")`` → ``events[0].event_type``, the form the database's errors use."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validate(model: type[BaseModelT], data: Any) -> BaseModelT:
    """``data`` as ``model``, or a 400 ``invalid_request`` naming the first field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{"field": field_path(tuple(e["loc"])), "message": e["msg"]}
                  for e in exc.errors(include_url=False, include_input=False)]
        first = errors[0]
        raise ApiError(400, "invalid_request", f"{first['field']}: {first['message']}",
                       field=first["field"], errors=errors) from None


def api_error(exc: Exception, request_id: str) -> ApiError:
    """The one translation of whatever a request raised into the answer the client gets."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestEntityTooLarge):
        return too_large()
    if isinstance(exc, psycopg.Error):
        err = from_database(exc)
        if err.status >= 500:
            log.error("database error (request %s) %s %s: %s", request_id, type(exc).__name__,
                      exc.diag.sqlstate, exc.diag.message_primary or str(exc).splitlines()[0])
        return err
    # The one place that turns a bug into a 500 without a traceback (the log has it).
    log.error("unhandled error (request %s)", request_id, exc_info=exc)
    return ApiError(500, "internal", "Unexpected error.", request_id=request_id)


def json_response(body: object, status: int = 200) -> flask.Response:
    return flask.Response(dumps(body), status=status, mimetype="application/json")


def error_response(exc: ApiError) -> flask.Response:
    response = json_response(exc.body(), exc.status)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="upshift"'
    retry_after = exc.fields.get("retry_after")
    if isinstance(retry_after, int):
        response.headers["Retry-After"] = str(retry_after)
    return response
