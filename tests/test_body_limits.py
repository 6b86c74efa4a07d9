"""Request bodies: bounded while they are read (chunked included), and never read for an anonymous caller.

The WSGI-level tests drive the app with a hand-built environ, the way gunicorn hands over a chunked
request (no ``CONTENT_LENGTH``, ``wsgi.input_terminated`` set), and a body stream that makes its
bytes up on demand and counts how many were taken. The last test starts a real gunicorn server and
sends it 300 MiB chunked POSTs, watching the worker's resident memory (current and peak).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import functions_framework
import jwt
import pytest
from werkzeug.test import create_environ, run_wsgi_app

from tests import stripe_fakes as sf
from tests.conftest import TEST_JWT_SECRET, bearer, make_token, serve
from upshift_platform.app import Platform, create_wsgi_app
from upshift_platform.http import MAX_BODY_BYTES, READ_CHUNK_BYTES
from upshift_platform.paths import project_root
from upshift_platform.settings import Settings, StripeSettings

MiB = 1024 * 1024
HUGE = 300 * MiB
CONSUME = {"action": "explain", "count": 1, "org_id": "acme"}


class LazyBody(io.RawIOBase):
    """``head`` then ``fill`` bytes up to ``total``, produced as read (never held); counts what was read."""

    def __init__(self, total: int, head: bytes = b"", fill: bytes = b" ") -> None:
        self.total, self.head, self.fill = total, head, fill
        self.taken = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.total - self.taken)
        if n <= 0:
            return 0
        start = self.taken
        view = memoryview(b)
        from_head = max(0, min(n, len(self.head) - start))
        if from_head:
            view[:from_head] = self.head[start:start + from_head]
        if n > from_head:
            view[from_head:n] = self.fill * (n - from_head)
        self.taken += n
        return n


def wsgi_post(app: Any, path: str, body: io.RawIOBase, headers: dict[str, str], *, content_length: int | None = None,
              method: str = "POST") -> tuple[int, dict[str, str], dict[str, Any]]:
    """Send ``body`` as a chunked request (gunicorn's environ), or with a declared ``content_length``."""
    environ = create_environ(path, method=method, headers={"Content-Type": "application/json", **headers})
    environ["wsgi.input"] = body
    environ.pop("CONTENT_LENGTH", None)
    if content_length is None:
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        environ["wsgi.input_terminated"] = True  # what gunicorn sets for a chunked body
    else:
        environ["CONTENT_LENGTH"] = str(content_length)
    app_iter, status, resp_headers = run_wsgi_app(app, environ, buffered=True)
    try:
        data = b"".join(app_iter)
    finally:
        getattr(app_iter, "close", lambda: None)()
    return int(status.split()[0]), dict(resp_headers), json.loads(data)


@pytest.fixture
def acme(world) -> dict[str, Any]:
    admin = world.user("admin@acme.test")
    org = world.org("acme", balance=100, admin=admin)
    return {"org": org, "admin": admin, "key": world.key(admin, org=org)["secret"]}


def org_balance(conn, org: str) -> int:
    return conn.execute("select balance as credit_balance from public.credit_accounts where id = %s", (org,)).fetchone()["credit_balance"]


@pytest.fixture
def reached(platform, monkeypatch) -> dict[str, int]:
    """Counts calls of the consume handler and of the database (``Database.request``)."""
    calls = {"handler": 0, "db": 0}
    route = next(r for r in platform.routers["billing"].routes if r.pattern == "/credits/consume")
    handler, db_request = route.handler, platform.db.request

    def counting_handler(ctx):  # type: ignore[no-untyped-def]
        calls["handler"] += 1
        return handler(ctx)

    def counting_request(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["db"] += 1
        return db_request(*args, **kwargs)

    monkeypatch.setattr(route, "handler", counting_handler)
    monkeypatch.setattr(platform.db, "request", counting_request)
    return calls


@pytest.fixture
def app(platform):  # type: ignore[no-untyped-def]
    return create_wsgi_app(platform)


def _no_role_token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "aud": "authenticated", "iat": now, "exp": now + 600}, TEST_JWT_SECRET, "HS256")


ANONYMOUS = [
    pytest.param(lambda u: {}, "Missing Authorization", id="no_header"),
    pytest.param(lambda u: {"Authorization": "Basic dXNlcjpwYXNz"}, "Malformed Authorization", id="basic_scheme"),
    pytest.param(lambda u: {"Authorization": "Bearer not-a-token"}, "Unrecognised token", id="garbage"),
    pytest.param(lambda u: bearer(make_token(u, secret="wrong-secret-0123456789abcdef0123")), "signature",
                 id="bad_signature"),
    pytest.param(lambda u: bearer(make_token(u, ttl=-3600)), "expired", id="expired_jwt"),
    pytest.param(lambda u: bearer(_no_role_token(u)), "'role'", id="jwt_without_role"),
]


# --- anonymous: 401 before a byte of the body is read -----------------------------------------


@pytest.mark.parametrize(("headers", "reason"), ANONYMOUS)
def test_anonymous_chunked_body_is_401_and_never_read(app, acme, conn, reached, headers, reason):
    body = LazyBody(HUGE)
    status, resp_headers, out = wsgi_post(app, "/credits/consume", body, headers(acme["admin"]))
    assert status == 401
    assert out["error"] == "unauthenticated" and reason in out["message"]
    assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    assert body.taken == 0
    assert reached == {"handler": 0, "db": 0}
    assert org_balance(conn, acme["org"]) == 100


def _authenticated_routes_with_bodies() -> list[Any]:
    from upshift_platform.app import build_routers

    seen: dict[tuple[str, str], Any] = {}
    for router in build_routers().values():
        for route in router.routes:
            if route.auth and route.method in ("POST", "PUT", "PATCH", "DELETE"):
                seen[(route.method, route.pattern)] = pytest.param(
                    route.method, re.sub(r"\{\w+\}", "00000000-0000-4000-8000-000000000000", route.pattern),
                    id=f"{route.method} {route.pattern}")
    return list(seen.values())


@pytest.mark.parametrize(("method", "path"), _authenticated_routes_with_bodies())
def test_every_authenticated_route_refuses_anonymous_bodies_unread(app, method, path):
    body = LazyBody(HUGE)
    status, _h, out = wsgi_post(app, path, body, {}, method=method)
    assert (status, out["error"], body.taken) == (401, "unauthenticated", 0)


def test_declared_content_length_too_large_is_refused_unread(app, acme, reached):
    anonymous = LazyBody(HUGE)
    status, _h, out = wsgi_post(app, "/credits/consume", anonymous, {}, content_length=HUGE)
    assert (status, out["error"]) == (401, "unauthenticated")  # who you are is asked first
    signed_in = LazyBody(HUGE)
    status, _h, out = wsgi_post(app, "/credits/consume", signed_in, bearer(make_token(acme["admin"])),
                                content_length=HUGE)
    assert (status, out["error"]) == (413, "payload_too_large")
    assert anonymous.taken == signed_in.taken == 0
    assert reached == {"handler": 0, "db": 0}


# --- authenticated: the stream is read up to the limit, then 413 ------------------------------


@pytest.mark.parametrize(
    "credential",
    [
        pytest.param(lambda a: bearer(make_token(a["admin"])), id="jwt"),
        pytest.param(lambda a: bearer(a["key"]), id="api_key"),
        # Only hashed before the body is read (its lookup shares the request's one transaction),
        # so an unknown key gets as far as the bounded read: 413, after at most the limit.
        pytest.param(lambda a: bearer("upk_" + "0" * 64), id="unknown_api_key"),
    ],
)
def test_chunked_body_over_the_limit_is_413_after_reading_at_most_the_limit(app, acme, conn, reached, credential):
    body = LazyBody(HUGE, head=json.dumps(CONSUME).encode())
    status, _h, out = wsgi_post(app, "/credits/consume", body, credential(acme))
    assert status == 413
    assert out["error"] == "payload_too_large" and str(MAX_BODY_BYTES) in out["message"]
    assert MAX_BODY_BYTES < body.taken <= MAX_BODY_BYTES + READ_CHUNK_BYTES
    assert reached == {"handler": 1, "db": 0}  # the handler ran, the database was never asked
    assert org_balance(conn, acme["org"]) == 100


class BrokenBody(LazyBody):
    """A client that goes away after ``total`` bytes (the server's stream raises, as gunicorn's does)."""

    def readinto(self, b: Any) -> int:
        if self.taken >= self.total:
            raise ConnectionResetError("peer went away")
        return super().readinto(b)


def test_a_body_that_breaks_off_is_a_400_not_a_500(app, acme, conn):
    status, _h, out = wsgi_post(app, "/credits/consume", BrokenBody(1000, head=b'{"action": "ex'),
                                bearer(make_token(acme["admin"])))
    assert (status, out["error"]) == (400, "unreadable_body")
    assert org_balance(conn, acme["org"]) == 100


def test_limit_is_exact_and_normal_bodies_still_work(app, client, acme, conn):
    token = bearer(make_token(acme["admin"]))
    payload = json.dumps(CONSUME).encode()
    status, _h, out = wsgi_post(app, "/credits/consume", LazyBody(len(payload), head=payload), token)
    assert (status, out["balance"]) == (200, 99)  # a small chunked body
    resp = client.post("/credits/consume", json=CONSUME, headers=token)
    assert (resp.status_code, resp.get_json()["balance"]) == (200, 98)  # an ordinary Content-Length body
    # JSON padded with whitespace to exactly the limit is accepted; one byte more is not.
    status, _h, out = wsgi_post(app, "/credits/consume", LazyBody(MAX_BODY_BYTES, head=payload), token)
    assert (status, out["balance"]) == (200, 97)
    status, _h, out = wsgi_post(app, "/credits/consume", LazyBody(MAX_BODY_BYTES + 1, head=payload), token)
    assert (status, out["error"]) == (413, "payload_too_large")
    big = payload + b" " * (MAX_BODY_BYTES + 1 - len(payload))
    resp = client.post("/credits/consume", data=big, headers={**token, "Content-Type": "application/json"})
    assert (resp.status_code, resp.get_json()["error"]) == (413, "payload_too_large")
    assert org_balance(conn, acme["org"]) == 97


def test_functions_framework_target_enforces_the_limit_without_flask_max_content_length(
        platform, acme, monkeypatch):
    """Deployed, functions-framework builds its own Flask app: the Router alone must hold the line."""
    import upshift_platform.app as app_module

    monkeypatch.setattr(app_module, "_platform", platform)
    ff_app = functions_framework.create_app("billing", str(project_root() / "main.py"))
    assert ff_app.config["MAX_CONTENT_LENGTH"] is None
    anonymous = LazyBody(HUGE)
    status, _h, out = wsgi_post(ff_app, "/credits/consume", anonymous, {})
    assert (status, out["error"], anonymous.taken) == (401, "unauthenticated", 0)
    signed_in = LazyBody(HUGE)
    status, _h, out = wsgi_post(ff_app, "/credits/consume", signed_in, bearer(make_token(acme["admin"])))
    assert (status, out["error"]) == (413, "payload_too_large")
    assert signed_in.taken <= MAX_BODY_BYTES + READ_CHUNK_BYTES


# --- the Stripe webhook: raw bytes for the signature, through the same bounded reader ----------


@pytest.fixture
def stripe_app(db_url):  # type: ignore[no-untyped-def]
    cfg = StripeSettings(secret_key=sf.SECRET_KEY, webhook_secret=sf.WEBHOOK_SECRET, prices=dict(sf.PRICES))
    plat = Platform(Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET, pool_max=2, stripe=cfg))
    yield create_wsgi_app(plat)
    plat.close()


def test_stripe_webhook_body_over_the_limit_is_413_even_when_correctly_signed(stripe_app, acme, conn):
    event = json.dumps(sf.checkout_completed("cs_big", "org", acme["org"], credits=300))
    padded = event + " " * (MAX_BODY_BYTES + 1 - len(event))  # valid JSON, validly signed, one byte too big
    _body, headers = sf.signed(padded)
    resp = stripe_app.test_client().post("/stripe/webhook", data=padded, headers=headers)
    assert (resp.status_code, resp.get_json()["error"]) == (413, "payload_too_large")
    chunked = LazyBody(HUGE, head=padded.encode())
    status, _h, out = wsgi_post(stripe_app, "/stripe/webhook", chunked, headers)
    assert (status, out["error"]) == (413, "payload_too_large")
    assert chunked.taken <= MAX_BODY_BYTES + READ_CHUNK_BYTES
    assert conn.execute("select count(*) as n from public.stripe_events").fetchone()["n"] == 0
    assert org_balance(conn, acme["org"]) == 100
    # The same event at its real size, chunked, is verified over the raw bytes and applied.
    _body, headers = sf.signed(event)
    status, _h, out = wsgi_post(stripe_app, "/stripe/webhook", LazyBody(len(event), head=event.encode()), headers)
    assert (status, out["outcome"]) == (200, "credits_granted")
    assert org_balance(conn, acme["org"]) == 400


# --- a real gunicorn server, a real 300 MiB chunked upload ------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def _reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass


def _chunked_post(port: int, path: str, headers: dict[str, str], total: int) -> dict[str, Any]:
    """Send ``total`` bytes as a chunked POST, one reused 256 KiB chunk at a time, reading the answer meanwhile.

    The server may answer and close before the upload ends (then sending fails with a broken pipe or
    a reset); the answer is read by a second thread as soon as it arrives, so it is not lost.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.putrequest("POST", path)
    for name, value in {**headers, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}.items():
        conn.putheader(name, value)
    conn.endheaders()
    sock = conn.sock
    assert sock is not None
    result: dict[str, Any] = {"sent": 0}

    def read_answer() -> None:
        resp = http.client.HTTPResponse(sock, method="POST")
        try:
            resp.begin()
            result.update(status=resp.status, body=json.loads(resp.read()),
                          www_authenticate=resp.getheader("WWW-Authenticate"))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            result["error"] = repr(exc)
        finally:
            resp.close()

    reader = threading.Thread(target=read_answer)
    reader.start()
    size = 256 * 1024
    frame = f"{size:x}\r\n".encode() + b" " * size + b"\r\n"
    try:
        while result["sent"] < total:
            sock.sendall(frame)
            result["sent"] += size
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server answered and stopped listening; the reader has (or gets) the answer
    reader.join(timeout=30)
    assert not reader.is_alive(), "no answer from the server"
    sock.close()
    return result


def test_real_server_300mib_chunked_posts_are_refused_in_bounded_memory(db_url, acme, capsys):
    proc, port = serve(db_url, workers=1)
    try:
        (worker,) = _children(proc.pid)
        # Warm the worker up on the same paths first (imports, pool, JSON), so what follows measures the body.
        for _ in range(3):
            warm = _chunked_post(port, "/credits/consume", bearer(acme["key"]), 0)
            assert warm["status"] == 400, warm  # an empty body: "action" is missing
        readings = []
        for label, headers, expected in [("no credentials", {}, (401, "unauthenticated")),
                                         ("valid API key", bearer(acme["key"]), (413, "payload_too_large"))]:
            before = _memory_kb(worker)
            _reset_peak(worker)
            started = time.monotonic()
            result = _chunked_post(port, "/credits/consume", headers, HUGE)
            after = _memory_kb(worker)
            assert (result.get("status"), result.get("body", {}).get("error")) == expected, result
            if expected[0] == 401:
                assert result["www_authenticate"].startswith("Bearer")
            assert _children(proc.pid) == [worker]  # same worker: not killed and replaced
            growth_mb = (max(after["VmHWM"], after["VmRSS"]) - before["VmRSS"]) / 1024
            readings.append(f"{label}: {expected[0]}, client sent {result['sent'] / MiB:.1f} MiB in "
                            f"{time.monotonic() - started:.2f}s; worker VmRSS {before['VmRSS'] / 1024:.1f} -> "
                            f"{after['VmRSS'] / 1024:.1f} MB, peak during request {after['VmHWM'] / 1024:.1f} MB "
                            f"(growth {growth_mb:.1f} MB)")
            assert growth_mb < 50, readings[-1]
        with capsys.disabled():
            print("\n" + "\n".join(readings))
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.status == 200  # still serving
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
