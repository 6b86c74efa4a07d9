"""An outsider speaks raw HTTP to the real server (``upshift-platform serve``: gunicorn, one worker).

Malformed framing, oversized request lines and headers, header injection and request smuggling
attempts: every answer must be an error the API documents (JSON with an ``error`` code), the worker
must survive, and nothing may be spent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import psycopg
import pytest

from tests.conftest import serve

SECRET = "outsider-server-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def server(pg_server_url: str, template_db: str) -> Iterator[dict[str, Any]]:
    name = f"{template_db[:-5]}_outsider_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}" template "{template_db}"')
    url = urlparse(pg_server_url)._replace(path=f"/{name}").geturl()
    with psycopg.connect(url, autocommit=True) as c:
        user = c.execute("insert into auth.users (email) values ('m@acme.test') returning id").fetchone()[0]
        org = c.execute("insert into public.orgs (slug, name, plan) values ('acme', 'Acme', 'team') returning id"
                        ).fetchone()[0]
        c.execute("insert into public.org_members values (%s, %s, 'member')", (org, user))
        c.execute("select public.grant_credits(100, 'admin_grant', 'acme', null, 'seed')")
        key = c.execute("select public.admin_create_api_key(%s, 'k', 'personal', 'acme') ->> 'secret'",
                        (user,)).fetchone()[0]
    proc, port = serve(url, workers=1, jwt_secret=SECRET)
    try:
        yield {"port": port, "key": key, "url": url, "org": str(org)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes, read the first response (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body[: int(headers.get("content-length", len(body)))]


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 1 << 30


def balance(server: dict[str, Any]) -> int:
    with psycopg.connect(server["url"]) as c:
        return c.execute("select a.balance from public.credit_accounts a join public.orgs o on o.id = a.id"
                         " where o.slug = 'acme'").fetchone()[0]


def json_error(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert 400 <= status < 500, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    parsed = json.loads(body)
    assert isinstance(parsed.get("error"), str), parsed
    return parsed


def consume(key: str, extra: bytes = b"", body: bytes = b'{"action": "explain", "count": 1}') -> bytes:
    return (b"POST /credits/consume HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() +
            b"\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


GUNICORN_HTML = pytest.mark.xfail(strict=True, reason="FINDING (info): gunicorn answers malformed or oversized "
                                  "requests itself with an HTML page (431/414/400 text/html) before the Router "
                                  "runs: not the JSON error docs/api.md promises for every error")


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\nConnection: close\r\n\r\n",
                 id="20kb_header", marks=GUNICORN_HTML),
    pytest.param(b"GET /api/orgs/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                 id="10kb_request_line", marks=GUNICORN_HTML),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\nConnection: close\r\n\r\n",
                 id="obsolete_line_folding", marks=GUNICORN_HTML),
    pytest.param(b"POST /credits/consume HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Authorization: Bearer upk_x\r\nConnection: close\r\n\r\nzz\r\n", id="bad_chunk_size"),
    pytest.param(b"POST /credits/consume HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 500\r\n"
                 b"Connection: close\r\n\r\nhello", id="two_content_lengths", marks=GUNICORN_HTML),
    pytest.param(b"GET /api/orgs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer upk_\r\nConnection: close\r\n\r\n",
                 id="empty_key_after_prefix"),
    pytest.param(b"GET /api/orgs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe.\xff.\xff\r\n"
                 b"Connection: close\r\n\r\n", id="binary_jwt"),
])
def test_malformed_requests_get_json_errors_and_the_worker_survives(server, request_bytes):
    before = balance(server)
    status, headers, body = raw(server["port"], request_bytes)
    json_error(status, headers, body)
    assert urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/health", timeout=5).status == 200
    assert balance(server) == before


@pytest.mark.parametrize("extra", [
    pytest.param(b"Transfer-Encoding: chunked\r\n", id="cl_and_te_smuggling"),
    pytest.param(b"X-Upshift-Org: acme\r\nX-Upshift-Org: other\r\n", id="two_org_headers"),
    pytest.param(b"Idempotency-Key: a\r\nIdempotency-Key: b\r\n", id="two_idempotency_headers"),
])
def test_ambiguous_framing_and_repeated_headers_spend_at_most_once(server, extra):
    """A smuggled second request in the body, or two values of one header, must not make a second spend."""
    smuggled = b'{"action": "explain", "count": 1}'
    inner = consume(server["key"], body=smuggled)
    before = balance(server)
    status, _, _ = raw(server["port"], consume(server["key"], extra=extra, body=smuggled) + inner)
    assert status in (200, 400, 403), status
    time.sleep(0.3)
    assert before - balance(server) <= 1


def test_crlf_in_a_header_value_is_not_reflected(server):
    status, headers, _body = raw(server["port"], b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                b"X-Request-Id: abc\rSet-Cookie: pwned=1\r\nConnection: close\r\n\r\n")
    assert "set-cookie" not in headers
    assert status in (200, 400)
