"""A small routing layer over Flask requests: path patterns, JSON bodies, one error mapper.

Every answer is JSON. Every failure becomes ``{"error": code, "message": ...}`` with a 4xx or
5xx status in ``Router.handle`` and nowhere else; a 500 never carries a traceback.

Request bodies are untrusted and unbounded on the wire (``Transfer-Encoding: chunked`` has no
length up front), so they are read in one place only, ``Ctx.raw_body``, which stops at
``MAX_BODY_BYTES``. On routes declared ``auth=True`` the caller is authenticated before any
handler runs, so an anonymous request never gets its body read at all.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import flask
import psycopg
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from .encoding import dumps
from .errors import ApiError, from_database

if TYPE_CHECKING:
    from .auth import Credential

log = logging.getLogger("upshift.request")
BaseModelT = TypeVar("BaseModelT", bound=BaseModel)
MAX_BODY_BYTES = 2 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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


def abandon_body(request: flask.Request) -> None:
    """Once the Router has answered, nobody reads the rest of the body.

    functions-framework registers an ``after_request`` hook that calls ``request.get_data()`` on every
    non-streamed response ("read the entire request before responding"). Unbounded, that would
    buffer in memory whatever the Router refused (a 413) or never read (a 401): an empty stream takes
    the body's place. What the handler read stays available as ``Ctx.raw_body()``.
    """
    request.stream = io.BytesIO()


@dataclass
class Ctx:
    """What a handler gets: the request, the platform, and what it learns about the caller."""

    request: flask.Request
    platform: Any
    request_id: str
    params: dict[str, str] = field(default_factory=dict)
    actor_id: str | None = None
    org_id: str | None = None
    # Set by Router.handle before the handler runs, on routes declared ``auth=True``.
    credential: Credential | None = None
    _body: bytes | None = field(default=None, repr=False)

    def raw_body(self) -> bytes:
        """The request body as bytes (read once, at most ``MAX_BODY_BYTES``; more is a 413)."""
        if self._body is None:
            self._body = read_body(self.request)
        return self._body

    def json(self) -> Any:
        raw = self.raw_body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, "invalid_json", f"The request body is not valid JSON: {exc}") from exc

    def body(self, model: type[BaseModelT]) -> BaseModelT:
        data = self.json()
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
        return validate(model, data)

    def query(self, model: type[BaseModelT], *, multi: tuple[str, ...] = ()) -> BaseModelT:
        args = self.request.args
        data: dict[str, Any] = {k: args.get(k) for k in args}
        for name in multi:
            if name in args:
                data[name] = args.getlist(name)
        return validate(model, data)


def validate(model: type[BaseModelT], data: dict[str, Any]) -> BaseModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        first = errors[0]
        raise ApiError(
            400, "invalid_request", f"{first['field']}: {first['message']}",
            field=first["field"], errors=errors,
        ) from None


Handler = Callable[[Ctx], "flask.Response | tuple[Any, int] | dict[str, Any]"]


@dataclass
class Route:
    method: str
    pattern: str
    regex: re.Pattern[str]
    handler: Handler
    summary: str = ""
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    error_models: dict[int, type[BaseModel]] = field(default_factory=dict)
    auth: bool = True


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")


class Router:
    """The routes of one function (one deployable HTTP target)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.routes: list[Route] = []

    def route(self, method: str, pattern: str, **meta: Any) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.routes.append(Route(method, pattern, _compile(pattern), fn, **meta))
            return fn

        return register

    def include(self, other: Router) -> None:
        self.routes.extend(other.routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route in self.routes:
            m = route.regex.match(path)
            if m:
                if route.method == method or (method == "HEAD" and route.method == "GET"):
                    return route, m.groupdict()
                allowed.append(route.method)
        if allowed:
            raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}.",
                           allowed=sorted(set(allowed)))
        raise ApiError(404, "not_found", f"No such endpoint: {path}.")

    def handle(self, platform: Any, request: flask.Request) -> flask.Response:
        started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        ctx = Ctx(request=request, platform=platform, request_id=rid)
        try:
            route, ctx.params = self.match(request.method, request.path)
            if route.auth:
                # Before the handler can touch the body: no credential, no body read (401).
                ctx.credential = platform.auth.credential(request.headers.get("Authorization"))
            if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
                raise too_large()  # declared too large: refused without reading a byte
            result = route.handler(ctx)
            response = to_response(result)
        except ApiError as exc:
            response = error_response(exc)
        except RequestEntityTooLarge:
            response = error_response(too_large())
        except psycopg.Error as exc:
            err = from_database(exc)
            if err.status >= 500:
                log.error("database error (request %s) %s %s: %s", rid, type(exc).__name__,
                          exc.diag.sqlstate, exc.diag.message_primary or str(exc).splitlines()[0])
            response = error_response(err)
        except Exception:  # the one place that turns a bug into a 500 without a traceback
            log.exception("unhandled error (request %s)", rid)
            response = error_response(ApiError(500, "internal", "Unexpected error.", request_id=rid))
        abandon_body(request)
        response.headers["X-Request-Id"] = rid
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        log.info(json.dumps({
            "function": self.name, "method": request.method, "path": request.path,
            "status": response.status_code, "duration_ms": duration_ms, "request_id": rid,
            "actor_id": ctx.actor_id, "org_id": ctx.org_id,
        }))
        return response


def to_response(result: Any) -> flask.Response:
    if isinstance(result, flask.Response):
        return result
    status = 200
    if isinstance(result, tuple):
        result, status = result
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    return json_response(result, status)


def json_response(body: Any, status: int = 200) -> flask.Response:
    return flask.Response(
        dumps(body),
        status=status, mimetype="application/json",
    )


def error_response(exc: ApiError) -> flask.Response:
    response = json_response(exc.body(), exc.status)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="upshift"'
    return response
