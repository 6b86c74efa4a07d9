"""A rule has one home: at each limit, the HTTP answer is the RPC's answer.

Value rules (ranges, lengths, sizes, counts) belong to the RPCs; the HTTP layer checks only the
JSON's shape. So for every boundary value, ``POST /credits/consume`` and ``POST /audit-events``
answer with the same status and ``error`` code as ``debit_credits`` and ``record_audit_events``
called directly as the same user (``acting_as``: what a ``supabase.rpc(...)`` client gets).
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import acting_as, bearer, claims_for, make_token

OK = ("ok", None)
EVENT = {"event_type": "deploy", "resource_type": "app", "resource_id": "web", "metadata": {}}


@pytest.fixture
def member(world) -> dict[str, Any]:
    user = world.user("member@acme.test")
    org = world.org("acme", plan="team", balance=2_000_000, admin=world.user("admin@acme.test"))
    world.member(org, user, "member")
    return {"user": user, "org": org, "token": make_token(user)}


def rpc_outcome(conn: psycopg.Connection[Any], user: str, sql: str, params: dict[str, Any]) -> tuple[Any, Any]:
    """The RPC's answer as that user, rolled back: ("ok", None), or (HTTP status, error code) from PTxyz."""
    try:
        with acting_as(conn, "authenticated", claims_for(user)) as cur:
            cur.execute(sql, params)
    except psycopg.Error as exc:
        state = exc.diag.sqlstate or ""
        assert state.startswith("PT"), f"not an API error: {state} {exc}"
        return int(state[2:]), json.loads(exc.diag.message_detail or "{}").get("error")
    return OK


def http_outcome(resp: Any) -> tuple[Any, Any]:
    if resp.status_code < 300:
        return OK
    return resp.status_code, resp.get_json()["error"]


CONSUME = [
    pytest.param({"count": 0}, id="count_0"),
    pytest.param({"count": -1}, id="count_negative"),
    pytest.param({"count": 1}, id="count_1"),
    pytest.param({"count": 1_000_000}, id="count_max"),
    pytest.param({"count": 1_000_001}, id="count_max_plus_1"),
    pytest.param({"count": 3_000_000}, id="count_over_balance_and_max"),
    pytest.param({"action": ""}, id="action_empty"),
    pytest.param({"action": "a" * 40}, id="action_40"),
    pytest.param({"action": "a" * 41}, id="action_41"),
    pytest.param({"action": "Explain"}, id="action_upper_case"),
    pytest.param({"action": "summon"}, id="action_unknown"),
    pytest.param({"action": "fix", "count": 1}, id="count_below_fix_price"),
    pytest.param({"idempotency_key": "k" * 200}, id="key_200"),
    pytest.param({"idempotency_key": "k" * 201}, id="key_201"),
    pytest.param({"idempotency_key": ""}, id="key_empty"),
]


@pytest.mark.parametrize("change", CONSUME)
def test_consume_limits_answer_like_debit_credits(client, conn, member, change):
    body = {"action": "explain", "count": 1, "org_id": "acme", **change}
    expected = rpc_outcome(conn, member["user"],
                           "select public.debit_credits(amount => %(amount)s, reason => %(reason)s, org => %(org)s,"
                           " idempotency_key => %(key)s, metadata => %(meta)s)",
                           {"amount": body["count"], "reason": body["action"], "org": body["org_id"],
                            "key": body.get("idempotency_key"),
                            "meta": Jsonb({"action": body["action"], "count": body["count"]})})
    resp = client.post("/credits/consume", json=body, headers=bearer(member["token"]))
    assert http_outcome(resp) == expected, resp.get_json()


def _events(n: int, **change: Any) -> list[dict[str, Any]]:
    return [{**EVENT, **change} for _ in range(n)]


INGEST = [
    pytest.param(_events(0), None, id="no_events"),
    pytest.param(_events(1), None, id="one_event"),
    pytest.param(_events(500), None, id="500_events"),
    pytest.param(_events(501), None, id="501_events"),
    pytest.param(_events(1, event_type="a" * 64), None, id="event_type_64"),
    pytest.param(_events(1, event_type="a" * 65), None, id="event_type_65"),
    pytest.param(_events(1, event_type=""), None, id="event_type_empty"),
    pytest.param(_events(1, resource_type="r" * 64), None, id="resource_type_64"),
    pytest.param(_events(1, resource_type="r" * 65), None, id="resource_type_65"),
    pytest.param(_events(1, resource_type=""), None, id="resource_type_empty"),
    pytest.param(_events(1, resource_id="x" * 512), None, id="resource_id_512"),
    pytest.param(_events(1, resource_id="x" * 513), None, id="resource_id_513"),
    # metadata as the database measures it (jsonb's text): {"x": "yyy…"} is 9 + n characters.
    pytest.param(_events(1, metadata={"x": "y" * (16384 - 9)}), None, id="metadata_16384"),
    pytest.param(_events(1, metadata={"x": "y" * (16385 - 9)}), None, id="metadata_16385"),
    pytest.param(_events(2, metadata={"x": "y" * (16385 - 9)}), None, id="metadata_16385_second"),
    pytest.param(_events(1, timestamp="2026-11-25T08:13:58.123456789+00:00"), None, id="timestamp_longest"),
    pytest.param(_events(1, timestamp="x" * 41), None, id="timestamp_41_chars"),
    pytest.param(_events(1), "k" * 200, id="key_200"),
    pytest.param(_events(1), "k" * 201, id="key_201"),
]


@pytest.mark.parametrize(("events", "key"), INGEST)
def test_ingest_limits_answer_like_record_audit_events(client, conn, member, events, key):
    expected = rpc_outcome(conn, member["user"],
                           "select public.record_audit_events(events => %(events)s, org => %(org)s,"
                           " idempotency_key => %(key)s)",
                           {"events": Jsonb(events), "org": "acme", "key": key})
    headers = {**bearer(member["token"]), **({"Idempotency-Key": key} if key else {})}
    resp = client.post("/audit-events", json={"events": events, "org_id": "acme"}, headers=headers)
    assert http_outcome(resp) == expected, resp.get_json()
    if len(events) == 1:  # the CLI's form, one event without the batch around it, is judged the same
        single = client.post("/audit-events", json={**events[0], "org_id": "acme"}, headers=bearer(member["token"]))
        assert http_outcome(single) == rpc_outcome(
            conn, member["user"], "select public.record_audit_events(events => %(events)s)",
            {"events": Jsonb([{**events[0], "org_id": "acme"}])}), single.get_json()


def test_the_limits_are_described_in_openapi_as_the_database_enforces_them(client):
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    count = schemas["Consume"]["properties"]["count"]
    assert (count["minimum"], count["maximum"]) == (1, 1_000_000)
    events = schemas["AuditBatchIn"]["properties"]["events"]
    assert (events["minItems"], events["maxItems"]) == (1, 500)
    assert schemas["AuditEventIn"]["properties"]["event_type"]["maxLength"] == 64
