"""Routes that do what they declare: the Router reads a handler's signature and supplies it.

A handler is a typed function; its parameters are its declaration::

    @router.route("POST", "/credits/consume", response=ConsumeResult, summary="...", errors=(400, 402))
    def consume(ctx: Ctx, body: Consume, db: Session) -> dict[str, Any]:
        return db.call_dict("debit_credits", amount=body.count, ...)

``body: Model``   the JSON body, read (bounded) and validated; ``raw: bytes`` the body unparsed
``query: Model``  the query string, validated (list fields take repeated parameters)
``{name}``        a path parameter: ``str``, or ``UUID`` (anything else is a 400)
``Session``       the caller is authenticated and the handler runs in the request's one
                  transaction as the caller, committed when it returns (``session.py``);
                  ``OpenSession`` lets the handler open that transaction itself, ``Backend``
                  gives it ``service_role`` transactions. A route with neither ``Session`` nor
                  ``OpenSession`` is public: nobody is authenticated.
``Ctx``           the request itself (headers, the platform, what the log line reports)

The route declares the rest: ``status``, ``response`` (the answer is validated against that
model and keeps only its fields), ``errors`` for OpenAPI. A handler returns JSON (a dict, a
list or a model), ``Html``, or a ``RowStream`` (rows streamed after its transaction committed).
The credential is checked before the body is read, and every failure becomes a JSON error in
``Router.handle`` only (``http.api_error``).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import NoneType, UnionType
from typing import Any, Protocol, TypeVar, Union, get_args, get_origin, get_type_hints

import flask
from pydantic import BaseModel

from .auth import Authenticator, Credential, request_headers
from .db import Database
from .errors import ApiError
from .http import (
    MAX_BODY_BYTES,
    ClientGone,
    abandon_body,
    api_error,
    client_gone,
    error_response,
    json_response,
    read_body,
    too_large,
    validate,
)
from .session import Backend, OpenSession, Row, Session, caller_session
from .settings import Settings

log = logging.getLogger("upshift.request")
F = TypeVar("F", bound=Callable[..., object])
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_UNREAD = object()


class Platform(Protocol):
    """What a request can reach: settings, the database pool, the authenticator, every function's routes."""

    @property
    def settings(self) -> Settings: ...
    @property
    def db(self) -> Database: ...
    @property
    def auth(self) -> Authenticator: ...
    @property
    def routers(self) -> Mapping[str, Router]: ...


@dataclass
class Ctx:
    """The request, the platform, and what the request's log line reports (actor, org)."""

    request: flask.Request
    platform: Platform
    request_id: str
    params: dict[str, str] = field(default_factory=dict)
    actor_id: str | None = None
    org_id: str | None = None
    credential: Credential | None = None  # set by Router.handle before the body is read, on authenticated routes
    _body: bytes | None = field(default=None, repr=False)
    _json: Any = field(default=_UNREAD, repr=False)

    def raw_body(self) -> bytes:
        """The request body as bytes (read once, at most ``MAX_BODY_BYTES``; more is a 413)."""
        if self._body is None:
            self._body = read_body(self.request)
        return self._body

    def json(self) -> Any:
        """The body parsed as JSON, once (an empty body is ``{}``)."""
        if self._json is _UNREAD:
            raw = self.raw_body()
            try:
                self._json = json.loads(raw) if raw else {}
            except ValueError as exc:
                raise ApiError(400, "invalid_json", f"The request body is not valid JSON: {exc}") from exc
            except RecursionError:
                raise ApiError(400, "invalid_json", "The request body is nested too deeply.") from None
        return self._json

    def json_if_parsed(self) -> Any:
        """The parsed body, or None when it was never read (refused first, or unreadable)."""
        return None if self._json is _UNREAD else self._json

    def header(self, name: str) -> str | None:
        """A request header, stripped; None when absent or blank."""
        return (self.request.headers.get(name) or "").strip() or None

    def note_org(self, org_id: object) -> None:
        """The org this request turned out to be about, for its log line."""
        if org_id:
            self.org_id = str(org_id)


@dataclass(frozen=True)
class Html:
    """A ``text/html`` answer (the pages Stripe Checkout returns to)."""

    text: str


@dataclass(frozen=True)
class RowStream:
    """Rows of ``sql`` streamed as text after the handler's transaction committed.

    They are read in another transaction acting as the same caller, through a server-side cursor
    (constant memory, however many rows), and ``render`` turns them into the answer's text.
    """

    sql: str
    params: dict[str, Any]
    render: Callable[[Iterator[Row]], Iterator[str]]
    mimetype: str
    headers: dict[str, str] = field(default_factory=dict)


Getter = Callable[[Ctx], object]


@dataclass
class Route:
    method: str
    pattern: str
    endpoint: Callable[..., object]  # the typed handler, as written
    summary: str = ""
    status: int = 200
    response: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    error_models: dict[int, type[BaseModel]] = field(default_factory=dict)
    media_types: tuple[str, ...] = ()  # a non-JSON answer's content types (Html: text/html)
    on_reject: Callable[[Ctx, ApiError], None] | None = None  # told of every 4xx answer, e.g. to log it
    fields: dict[str, str] = field(default_factory=dict)  # an RPC argument -> the body field that carries it
    # Read from the endpoint's signature:
    body: type[BaseModel] | None = field(init=False, default=None)
    query: type[BaseModel] | None = field(init=False, default=None)
    auth: bool = field(init=False, default=False)
    regex: re.Pattern[str] = field(init=False)
    handler: Callable[[Ctx], flask.Response] = field(init=False)  # everything after authentication
    _inputs: list[tuple[int, str, Getter]] = field(init=False, default_factory=list)  # (order, name, getter)
    _session: str | None = field(init=False, default=None)
    _open_session: str | None = field(init=False, default=None)
    _backend: str | None = field(init=False, default=None)

    @property
    def name(self) -> str:
        return self.endpoint.__name__

    def __post_init__(self) -> None:
        self.regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")
        hints = get_type_hints(self.endpoint)
        returns = hints.pop("return", None)
        path_names = set(re.findall(r"\{(\w+)\}", self.pattern))
        for name in inspect.signature(self.endpoint).parameters:
            self._declare(name, hints.get(name), path_names)
        self._inputs.sort(key=lambda item: item[0])  # path, then query, then the body: the body is read last
        missing = path_names - {name for _, name, _ in self._inputs}
        if missing:
            raise TypeError(f"{self.name}: takes no parameter for {sorted(missing)} in {self.pattern}")
        self.auth = bool(self._session or self._open_session)
        if returns is Html:
            self.media_types = self.media_types or ("text/html",)
        elif (returns is RowStream) != bool(self.media_types):
            raise TypeError(f"{self.name}: a RowStream answer declares its media_types, a JSON answer none")
        if returns is RowStream and not self._session:
            raise TypeError(f"{self.name}: a RowStream is streamed as the caller: the handler needs a Session")
        self.handler = self._handle

    def _declare(self, name: str, kind: Any, path_names: set[str]) -> None:
        getter: Getter
        order = 2
        if kind is Ctx:
            getter, order = _ctx, 0
        elif kind is Session:
            self._session = name
            return
        elif kind is OpenSession:
            self._open_session = name
            return
        elif kind is Backend:
            self._backend = name
            return
        elif name in path_names and kind in (str, uuid.UUID):
            getter, order = _path_param(name, kind), 1
        elif name == "raw" and kind is bytes:
            getter, order = Ctx.raw_body, 3
        elif name == "query" and isinstance(kind, type) and issubclass(kind, BaseModel):
            self.query, getter = kind, _query(kind)
        elif name == "body" and isinstance(kind, type) and issubclass(kind, BaseModel):
            self.body, getter, order = kind, _body(kind), 3
        else:
            raise TypeError(f"{self.name}: the Router cannot supply parameter {name!r} ({kind!r})")
        self._inputs.append((order, name, getter))

    def _handle(self, ctx: Ctx) -> flask.Response:
        """Inputs (path, query, body: 400/413 before any transaction), then the handler, then its answer."""
        kwargs = {name: get(ctx) for _, name, get in self._inputs}
        if (self._session or self._open_session or self._backend) and client_gone(ctx.request):
            raise ClientGone()  # it hung up while the request waited: no transaction for nobody
        if self._backend:
            kwargs[self._backend] = Backend(ctx.platform.db)
        if self._open_session:
            kwargs[self._open_session] = OpenSession(_as_caller(ctx))
        if not self._session:
            return self._respond(ctx, self._answer(self.endpoint(**kwargs)), None)
        with _as_caller(ctx) as db:
            kwargs[self._session] = db
            answer = self._answer(self.endpoint(**kwargs))  # checked before the transaction commits
        return self._respond(ctx, answer, db)

    def _answer(self, result: object) -> object:
        """Html and RowStream as they are; JSON through the declared response model (its fields only)."""
        if isinstance(result, Html | RowStream):
            return result
        if self.response is not None:
            result = result if isinstance(result, self.response) else self.response.model_validate(result)
        if isinstance(result, BaseModel):
            return result.model_dump(exclude_unset=True)
        return result

    def _respond(self, ctx: Ctx, answer: object, db: Session | None) -> flask.Response:
        if isinstance(answer, Html):
            return flask.Response(answer.text, status=self.status, mimetype="text/html")
        if isinstance(answer, RowStream):
            assert db is not None  # checked at registration: a RowStream route takes a Session
            rows = ctx.platform.db.stream("authenticated", db.actor.claims, db.headers, answer.sql, answer.params)
            return flask.Response(answer.render(rows), status=self.status, mimetype=answer.mimetype,
                                  headers=answer.headers)
        return json_response(answer, self.status)


def _ctx(ctx: Ctx) -> Ctx:
    return ctx


def _path_param(name: str, kind: type) -> Getter:
    def get(ctx: Ctx) -> object:
        raw = ctx.params[name]
        if kind is str:
            return raw
        try:
            return uuid.UUID(raw)
        except ValueError:
            raise ApiError(400, "invalid_request", f"{name}: not a UUID.", field=name) from None

    return get


def _body(model: type[BaseModel]) -> Getter:
    def get(ctx: Ctx) -> object:
        data = ctx.json()
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
        return validate(model, data)

    return get


def _is_list(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, UnionType):
        return any(_is_list(a) for a in get_args(annotation) if a is not NoneType)
    return get_origin(annotation) is list


def _query(model: type[BaseModel]) -> Getter:
    repeated = {name for name, info in model.model_fields.items() if _is_list(info.annotation)}

    def get(ctx: Ctx) -> object:
        args = ctx.request.args
        return validate(model, {k: args.getlist(k) if k in repeated else args.get(k) for k in args})

    return get


@contextmanager
def _as_caller(ctx: Ctx) -> Iterator[Session]:
    plat = ctx.platform
    credential = ctx.credential or plat.auth.credential(ctx.request.headers.get("Authorization"))
    headers = request_headers(ctx.request, plat.settings.trusted_networks)
    with caller_session(plat.db, credential, headers) as db:
        try:
            yield db
        finally:
            ctx.actor_id = db.known_actor_id()


class Router:
    """The routes of one function (one deployable HTTP target)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.routes: list[Route] = []

    def route(self, method: str, pattern: str, *, summary: str, status: int = 200,
              response: type[BaseModel] | None = None, errors: tuple[int, ...] = (),
              error_models: dict[int, type[BaseModel]] | None = None, media_types: tuple[str, ...] = (),
              on_reject: Callable[[Ctx, ApiError], None] | None = None,
              fields: dict[str, str] | None = None) -> Callable[[F], F]:
        """``fields`` names an RPC's arguments as this route's body does, in the errors the database raises
        (debit_credits' ``amount`` is consume's ``count``): the rule stays in SQL, the wording is the API's."""
        def register(fn: F) -> F:
            self.routes.append(Route(method, pattern, fn, summary=summary, status=status, response=response,
                                     errors=errors, error_models=error_models or {}, media_types=media_types,
                                     on_reject=on_reject, fields=fields or {}))
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

    def handle(self, platform: Platform, request: flask.Request) -> flask.Response:
        started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        ctx = Ctx(request=request, platform=platform, request_id=rid)
        route: Route | None = None
        try:
            route, ctx.params = self.match(request.method, request.path)
            if route.auth:
                # Before the handler can touch the body: no credential, no body read (401).
                ctx.credential = platform.auth.credential(request.headers.get("Authorization"))
            if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
                raise too_large()  # declared too large: refused without reading a byte
            response = route.handler(ctx)
        except Exception as exc:  # every failure, mapped once
            err = api_error(exc, rid)
            if route is not None and err.fields.get("field") in route.fields:
                err.fields["field"] = route.fields[err.fields["field"]]
            if route is not None and route.on_reject is not None and err.status < 500 and err.status != 499:
                route.on_reject(ctx, err)
            response = error_response(err)
        abandon_body(request)
        response.headers["X-Request-Id"] = rid
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        log.info(json.dumps({
            "function": self.name, "method": request.method, "path": request.path,
            "status": response.status_code, "duration_ms": duration_ms, "request_id": rid,
            "actor_id": ctx.actor_id, "org_id": ctx.org_id,
        }))
        return response
