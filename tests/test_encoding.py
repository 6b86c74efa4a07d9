"""One JSON encoding for every answer: every endpoint driven against the real database.

An org with members, keys, spends, invites, audit events, a checkout and a webhook; then every
route is called (the walk fails if a route is missing from it), and every timestamp-looking
field in every JSON answer (and every NDJSON export line) must be RFC 3339 with a ``T``, every
id-looking field a string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from tests import stripe_fakes as sf
from tests.conftest import bearer, make_token, stripe_settings
from upshift_platform.app import Platform, create_wsgi_app
from upshift_platform.signing import AuditSigningKey

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
LOOKS_LIKE_A_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")
TIME_KEYS = re.compile(r"(^|_)(at|timestamp|since|until)$")
ID_KEYS = re.compile(r"(^|_)ids?$")
UPGRADE = {"event_type": "upgrade", "resource_type": "package", "resource_id": "is-number",
           "metadata": {"from_version": "6.0.0", "to_version": "7.0.0", "outcome": "success"},
           "org_id": "acme", "timestamp": "2026-11-25T08:13:58.336Z"}


@dataclass
class Answer:
    method: str
    route: str  # the route's pattern
    url: str
    status: int
    content_type: str
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Walker:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.client = create_wsgi_app(platform).test_client()
        self.answers: list[Answer] = []

    def __call__(self, method: str, url: str, token: str | None = None, *, json_body: Any = None,
                 data: str | None = None, headers: dict[str, str] | None = None, expect: int = 200) -> Answer:
        path = url.split("?", 1)[0]
        route, _params = self.platform.routers[self.platform.function_for(path)].match(method, path)
        resp = self.client.open(url, method=method, json=json_body, data=data,
                                headers={**(bearer(token) if token else {}), **(headers or {})})
        answer = Answer(method, route.pattern, url, resp.status_code, resp.mimetype, resp.get_data(as_text=True))
        assert answer.status == expect, (method, url, answer.text)
        self.answers.append(answer)
        return answer


@pytest.fixture
def walked(db_url, world, standin) -> list[Answer]:
    plat = Platform(stripe_settings(db_url, standin, audit_signing_key=AuditSigningKey.from_seed(b"\x07" * 32)))
    try:
        yield walk(Walker(plat), world)
    finally:
        plat.close()


def walk(call: Walker, world: Any) -> list[Answer]:
    admin, member, viewer = world.user("admin@acme.test"), world.user("member@acme.test"), world.user("v@acme.test")
    extra, newcomer = world.user("extra@acme.test"), world.user("new@acme.test")
    org = world.org("acme", plan="team", balance=100, admin=admin)
    world.member(org, member, "member")
    world.member(org, viewer, "viewer")
    world.member(org, extra, "member")
    member_key, ci_key = world.key(member, org=org)["secret"], world.key(admin, kind="service", org=org)["secret"]
    adm, mem, new = make_token(admin), make_token(member), make_token(newcomer)

    call("GET", "/health")
    call("GET", "/health/live")
    call("GET", "/openapi.json")
    # orgs, members, invites, keys, profile
    side = call("POST", "/api/orgs", mem, json_body={"name": "Side", "slug": "side"}, expect=201).json()
    call("GET", "/api/orgs", mem)
    call("GET", "/api/orgs/acme", adm)
    call("PATCH", f"/api/orgs/{side['id']}", mem, json_body={"name": "Side Project"})
    call("GET", "/api/orgs/acme/members", adm)
    call("PATCH", f"/api/orgs/acme/members/{extra}", adm, json_body={"role": "viewer"})
    call("DELETE", f"/api/orgs/acme/members/{extra}", adm)
    dropped = call("POST", "/api/orgs/acme/invites", adm, json_body={"email": "x@acme.test"}, expect=201).json()
    invite = call("POST", "/api/orgs/acme/invites", adm, json_body={"email": "new@acme.test", "role": "member"},
                  expect=201).json()
    call("GET", "/api/orgs/acme/invites", adm)
    call("DELETE", f"/api/orgs/acme/invites/{dropped['id']}", adm)
    call("POST", "/api/invites/accept", new, json_body={"token": invite["token"]})
    key = call("POST", "/api/api-keys", adm, json_body={"name": "GitHub Actions", "kind": "service", "org_id": "acme",
                                                        "expires_at": "2099-01-01T00:00:00Z"}, expect=201).json()
    call("GET", "/api/api-keys", adm)
    call("DELETE", f"/api/api-keys/{key['id']}", adm)
    call("PUT", "/api/me/default-org", mem, json_body={"org_id": "acme"})
    call("GET", "/api/me", mem)
    call("GET", "/api/me", ci_key)
    # credits
    for token in (member_key, ci_key):
        call("POST", "/credits/consume", token, json_body={"action": "explain", "count": 1},
             headers={"Idempotency-Key": f"walk-{uuid.uuid4().hex}"})
    call("GET", "/billing/status", member_key)
    call("GET", "/api/credits/transactions?org_id=acme&limit=2", adm)
    call("GET", "/api/credits/transactions", mem)
    call("GET", "/api/orgs/acme/usage?group_by=day,actor", adm)
    # audit
    call("POST", "/audit-events", ci_key, json_body=UPGRADE, expect=201)
    call("POST", "/audit-events", member_key, json_body={"events": [UPGRADE, {**UPGRADE, "timestamp": None}]},
         expect=201)
    call("GET", "/api/audit-logs?org_id=acme&limit=5", viewer_token := make_token(viewer))
    call("GET", "/api/audit-logs", make_token(extra))  # no org context (extra left acme): their personal log
    call("GET", "/api/audit-logs/export?org_id=acme", adm)
    call("GET", "/api/audit-logs/export?org_id=acme&format=csv", adm)
    call("GET", "/api/audit-logs/verify?org_id=acme", adm)
    cp = call("GET", "/api/audit-logs/checkpoint?org_id=acme", viewer_token).json()
    call("GET", f"/api/audit-logs/verify?org_id=acme&checkpoint_seq={cp['seq']}&checkpoint_hash={cp['hash']}", adm)
    call("GET", "/api/audit-logs/public-key")
    # billing: checkout, the pages Stripe returns to, the webhook
    call("POST", "/billing/checkout/credits", adm, json_body={"pack": "small", "org_id": "acme", "token": "x"})
    call("POST", "/billing/checkout/subscription", mem, json_body={"tier": "pro"})
    call("GET", "/billing/success?session_id=cs_1")
    call("GET", "/billing/cancel")
    body, headers = sf.signed(sf.checkout_completed("cs_walk", "org", org, credits=300))
    call("POST", "/stripe/webhook", data=body, headers=headers)
    # errors are answers too
    call("GET", "/api/orgs/nope", adm, expect=403)
    call("POST", "/credits/consume", mem, json_body={"action": "explain", "count": 5000}, expect=402)
    return call.answers


def every_route() -> set[tuple[str, str]]:
    from upshift_platform.app import build_routers

    return {(r.method, r.pattern) for router in build_routers().values() for r in router.routes}


def check_value(where: str, key: str | None, value: Any, problems: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            check_value(f"{where}.{k}", k, v, problems)
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_value(f"{where}[{i}]", key, v, problems)
        return
    if isinstance(value, str) and LOOKS_LIKE_A_TIME.match(value) and not RFC3339.match(value):
        problems.append(f"{where}: {value!r} is not RFC 3339 with T")
    if key and TIME_KEYS.search(key) and value is not None and not (isinstance(value, str) and RFC3339.match(value)):
        problems.append(f"{where}: {value!r} is not an RFC 3339 timestamp")
    if key and ID_KEYS.search(key) and value is not None and not isinstance(value, str):
        problems.append(f"{where}: id {value!r} is not a string")


def test_every_route_is_walked(walked):
    assert {(a.method, a.route) for a in walked} == every_route()


def test_every_json_answer_has_rfc3339_times_and_string_ids(walked):
    problems: list[str] = []
    checked = 0
    for answer in walked:
        where = f"{answer.method} {answer.url} ({answer.status})"
        if answer.route == "/openapi.json":
            answer.json()  # a document about fields, not data
        elif answer.content_type == "application/json":
            check_value(where, None, answer.json(), problems)
            checked += 1
        elif answer.content_type == "application/x-ndjson":
            lines = answer.text.splitlines()
            assert lines
            for i, line in enumerate(lines):
                check_value(f"{where} line {i}", None, json.loads(line), problems)
            checked += 1
        else:
            assert answer.content_type in ("text/csv", "text/html"), where
    assert not problems, "\n".join(problems)
    assert checked == len(walked) - 4  # all but /openapi.json, the CSV export and the two HTML pages


def test_the_walk_sees_timestamps_from_python_and_from_the_database(walked):
    """Both sources of times are covered: rows read by Python (datetime) and RPC answers (jsonb)."""
    first = {}
    for a in walked:
        first.setdefault((a.method, a.url), a)
    tx = first[("GET", "/api/credits/transactions?org_id=acme&limit=2")].json()["data"][0]
    me = first[("GET", "/api/me")].json()
    assert RFC3339.match(tx["created_at"]) and RFC3339.match(me["created_at"])
    assert isinstance(tx["amount"], int) and isinstance(tx["id"], str)


# --- the encoder itself ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [
    pytest.param(datetime(2026, 11, 25, 12, 0, 12, 446617, tzinfo=UTC), '"2026-11-25T12:00:12.446617+00:00"',
                 id="datetime_utc"),
    pytest.param(datetime(2026, 11, 25, 12, 0, 12, 440000, tzinfo=UTC), '"2026-11-25T12:00:12.44+00:00"',
                 id="trailing_zeros_dropped_like_postgres"),
    pytest.param(datetime(2026, 11, 25, 12, 0, tzinfo=timezone(timedelta(hours=-5))), '"2026-11-25T12:00:00-05:00"',
                 id="whole_seconds_offset"),
    pytest.param(datetime(2026, 11, 25, 12, 0), '"2026-11-25T12:00:00"', id="naive"),
    pytest.param(date(2026, 11, 25), '"2026-11-25"', id="date"),
    pytest.param(uuid.UUID("6a63e2f0-0000-4000-8000-000000000001"), '"6a63e2f0-0000-4000-8000-000000000001"',
                 id="uuid"),
    pytest.param(Decimal("12"), "12", id="whole_decimal"),
    pytest.param(Decimal("1.50"), "1.5", id="decimal"),
    pytest.param({"a": [1, None, True]}, '{"a":[1,null,true]}', id="plain"),
])
def test_the_one_encoder(value, text):
    from upshift_platform.encoding import dumps

    assert dumps(value) == text


def test_the_encoder_refuses_what_it_does_not_know():
    from upshift_platform.encoding import dumps

    with pytest.raises(TypeError):
        dumps({"x": object()})
