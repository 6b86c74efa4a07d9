"""An outsider attacks our HTTP functions: hostile bodies, headers, paths, the checkpoint endpoints, and the
Stripe webhook without its secret.

Every refusal must be a 4xx with a JSON body ``{"error": code, "message": ...}`` (never a 500, a
traceback or HTML), and must leave the database exactly as it was.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import stripe

from tests import stripe_fakes as sf
from tests.conftest import TEST_JWT_SECRET, bearer, make_token
from tests.test_outsider_rpc import assert_chains_verify, assert_ledger_ok, snapshot
from upshift_platform.settings import Settings, StripeSettings
from upshift_platform.signing import AuditSigningKey

SEED = b"\x07" * 32
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def settings(db_url):
    """Stripe's webhook secret (no API key) and an audit signing key, for conftest's ``platform`` and ``client``."""
    return Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET, pool_max=4,
                    stripe=StripeSettings(webhook_secret=sf.WEBHOOK_SECRET),
                    audit_signing_key=AuditSigningKey.from_seed(SEED))


@pytest.fixture
def acme(world):
    acme = world.team(balance=100)
    rival_admin = world.user("boss@rival.test")
    rival = world.org("rival", plan="team", balance=50, admin=rival_admin)
    proorg = world.org("proorg", plan="pro", admin=rival_admin)
    return {**acme, "rival": rival, "proorg": proorg, "rival_admin": rival_admin,
            "member_key": world.key(acme["member"], org=acme["org"])["secret"],
            "ci_key": world.key(acme["admin"], kind="service", org=acme["org"])["secret"],
            "rival_ci": world.key(rival_admin, kind="service", org=rival)["secret"]}


def is_json_error(resp) -> dict[str, Any]:
    assert resp.status_code < 500, (resp.status_code, resp.data[:300])
    assert resp.mimetype == "application/json", (resp.mimetype, resp.data[:300])
    body = json.loads(resp.data)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body
    assert "Traceback" not in resp.get_data(as_text=True)
    return body


def refused_unchanged(conn, before, resp, *statuses: int) -> dict[str, Any]:
    body = is_json_error(resp)
    assert resp.status_code in (statuses or range(400, 500)), (resp.status_code, body)
    assert snapshot(conn) == before
    assert_ledger_ok(conn)
    return body


# --- hostile bodies ---------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
BODY_ATTACKS = [
    # (path, raw body or json-able, extra headers)
    pytest.param("/credits/consume", '{"action": "explain", "count": 1', id="truncated_json"),
    pytest.param("/credits/consume", "\ufeff{}", id="bom_then_json"),
    pytest.param("/credits/consume", b"\xff\xfe{\x00}\x00", id="utf16_body"),
    pytest.param("/credits/consume", b"\xc3\x28", id="invalid_utf8"),
    pytest.param("/credits/consume", "[]", id="array_not_object"),
    pytest.param("/credits/consume", "null", id="json_null"),
    pytest.param("/credits/consume", '"explain"', id="json_string"),
    pytest.param("/credits/consume", "1e999", id="json_infinity_number"),
    pytest.param("/credits/consume", "NaN", id="json_nan"),
    pytest.param("/credits/consume", {"action": "explain", "count": "1"}, id="count_as_string"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1.0}, id="count_as_float"),
    pytest.param("/credits/consume", {"action": "explain", "count": True}, id="count_as_bool"),
    pytest.param("/credits/consume", {"action": "explain", "count": None}, id="count_null"),
    pytest.param("/credits/consume", {"action": "explain", "count": [1]}, id="count_array"),
    pytest.param("/credits/consume", {"action": "explain", "count": {"$gt": 0}}, id="count_operator_object"),
    pytest.param("/credits/consume", {"action": "explain", "count": -1}, id="count_negative"),
    pytest.param("/credits/consume", {"action": "explain", "count": 0}, id="count_zero"),
    pytest.param("/credits/consume", {"action": "explain", "count": 2**63}, id="count_2_pow_63"),
    pytest.param("/credits/consume", '{"action": "explain", "count": 1' + "0" * 5000 + "}", id="count_5000_digits"),
    pytest.param("/credits/consume", {"action": "fix", "count": 1}, id="count_below_price"),
    pytest.param("/credits/consume", {"action": "explain\u0000", "count": 1}, id="action_with_nul"),
    pytest.param("/credits/consume", {"action": "__proto__", "count": 1}, id="action_proto"),
    pytest.param("/credits/consume", {"action": ["explain"], "count": 1}, id="action_array"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "idempotency_key": "a\u0000b"},
                 id="idempotency_key_with_nul"),
    pytest.param("/credits/consume", '{"action": "explain", "count": 1, "idempotency_key": "\\ud800"}',
                 id="idempotency_key_lone_surrogate"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "idempotency_key": "k" * 201},
                 id="idempotency_key_201_chars"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "idempotency_key": ""}, id="empty_key"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "org_id": "rival"}, id="org_rival"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "org_id": "\u0430cme"}, id="org_cyrillic_a"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "org_id": "acme\u0000"}, id="org_with_nul"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "org_id": "../rival"}, id="org_traversal"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "org_id": "acme' or '1'='1"},
                 id="org_sql_injection"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "org_id": "x" * 65}, id="org_65_chars"),
    pytest.param("/credits/consume", {"action": "explain", "count": 1, "org_id": {"id": "acme"}}, id="org_object"),
    pytest.param("/credits/consume", '{"action": "explain", "count": 1, "org_id": "acme", "org_id": "rival"}',
                 id="duplicate_org_keys_rival_last"),
    pytest.param("/audit-events", {"event_type": "credit_debit", "resource_type": "x"}, id="audit_reserved_type"),
    pytest.param("/audit-events", '{"event_type": "deploy", "resource_type": "x", "event_type": "credits_granted"}',
                 id="audit_duplicate_key_reserved_last"),
    pytest.param("/audit-events", {"event_type": "deploy", "resource_type": "x", "metadata": [1]},
                 id="audit_metadata_array"),
    pytest.param("/audit-events", {"event_type": "deploy", "resource_type": "x", "metadata": "{}"},
                 id="audit_metadata_string"),
    pytest.param("/audit-events", '{"event_type": "deploy", "resource_type": "x", "metadata": {"a": NaN}}',
                 id="audit_metadata_nan"),
    pytest.param("/audit-events", '{"event_type": "deploy", "resource_type": "x", "metadata": {"a": -Infinity}}',
                 id="audit_metadata_infinity"),
    pytest.param("/audit-events", {"event_type": "deploy", "resource_type": "x", "metadata": {"a": "\u0000"}},
                 id="audit_metadata_nul"),
    pytest.param("/audit-events", '{"event_type": "deploy", "resource_type": "x", "metadata": {"\\udfff": 1}}',
                 id="audit_metadata_lone_surrogate_key"),
    pytest.param("/audit-events", {"event_type": "deploy", "resource_type": "x", "metadata": {"p": "x" * 17000}},
                 id="audit_metadata_17kb"),
    pytest.param("/audit-events", {"event_type": "deploy", "resource_type": "x", "timestamp": "2026-02-30"},
                 id="audit_impossible_date"),
    pytest.param("/audit-events", {"event_type": "deploy", "resource_type": "x", "timestamp": "99999-01-01"},
                 id="audit_five_digit_year"),
    pytest.param("/audit-events", {"event_type": "deploy", "resource_type": "x", "timestamp": "2026-01-01T00:00+99"},
                 id="audit_tz_out_of_range"),
    pytest.param("/audit-events", {"event_type": "deploy", "resource_type": "x", "org_id": "rival"},
                 id="audit_into_rival"),
    pytest.param("/audit-events", {"events": [{"event_type": "deploy", "resource_type": "x"}] * 501},
                 id="audit_501_events"),
    pytest.param("/audit-events", {"events": [{"event_type": "deploy", "resource_type": "x"},
                                              {"event_type": "deploy", "resource_type": "x", "org_id": "rival"}]},
                 id="audit_batch_second_event_in_rival"),
    pytest.param("/audit-events", {"events": [{"event_type": "deploy", "resource_type": "x"}, "deploy"]},
                 id="audit_batch_string_event"),
    pytest.param("/audit-events", {"events": {"0": {"event_type": "deploy", "resource_type": "x"}}},
                 id="audit_events_object"),
    pytest.param("/audit-events", {"events": []}, id="audit_events_empty"),
    pytest.param("/api/orgs", {"name": "X", "slug": "acme"}, id="create_org_taken_slug"),
    pytest.param("/api/orgs", {"name": "X", "slug": "ACME"}, id="create_org_taken_slug_upper"),
    pytest.param("/api/orgs", {"name": "X", "slug": "12345678-1234-"}, id="create_org_uuid_like_slug"),
    pytest.param("/api/orgs", {"name": "X", "slug": "new", "plan": "team"}, id="create_org_with_plan"),
    pytest.param("/api/orgs", {"name": "X", "slug": "new", "credit_balance": 10**6}, id="create_org_with_balance"),
    pytest.param("/api/orgs", {"name": " ", "slug": "new"}, id="create_org_blank_name"),
    pytest.param("/api/invites/accept", {"token": "upi_" + "0" * 64}, id="accept_unknown_invite"),
    pytest.param("/api/invites/accept", {"token": ["upi_x"]}, id="accept_token_array"),
    pytest.param("/api/api-keys", {"name": "ci", "kind": "service", "org_id": "acme"}, id="member_mints_ci_key"),
    pytest.param("/api/api-keys", {"name": "ci", "kind": "admin"}, id="key_kind_admin"),
    pytest.param("/api/api-keys", {"name": "p", "expires_at": "1999-01-01T00:00:00Z"}, id="key_expired_already"),
    pytest.param("/api/api-keys", {"name": "p", "org_id": "rival"}, id="key_bound_to_rival"),
]


@pytest.mark.parametrize(("path", "body"), BODY_ATTACKS)
def test_hostile_bodies_are_json_4xx_and_change_nothing(client, conn, acme, path, body):
    before = snapshot(conn)
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, str | bytes) else {"json": body}
    resp = client.post(path, headers={**JSON, **bearer(acme["member_key"])}, **kwargs)
    refused_unchanged(conn, before, resp)


@pytest.mark.parametrize("body", [
    pytest.param({"action": "explain", "count": 1, "role": "admin", "user_id": "x", "amount": -5}, id="extra_fields"),
    pytest.param('{"action": "explain", "count": 5000, "count": 1}', id="duplicate_count_last_wins"),
])
def test_lenient_consume_bodies_charge_exactly_what_is_parsed(client, conn, acme, body):
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, str) else {"json": body}
    resp = client.post("/credits/consume", headers={**JSON, **bearer(acme["member_key"])}, **kwargs)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["balance"] == 99
    assert_ledger_ok(conn)


@pytest.mark.parametrize(("path", "key"), [
    pytest.param("/credits/consume", "member_key", id="consume_member"),
    pytest.param("/audit-events", "ci_key", id="audit_ci"),
    pytest.param("/api/orgs", "member_key", id="create_org_member"),
    pytest.param("/credits/consume", None, id="consume_unknown_api_key"),
])
def test_deeply_nested_json_is_a_400(client, conn, acme, path, key):
    before = snapshot(conn)
    token = acme[key] if key else "upk_" + "0" * 64
    resp = client.post(path, data=DEEP, headers={**JSON, **bearer(token)})
    refused_unchanged(conn, before, resp, 400, 401)


# --- hostile headers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    pytest.param({"Authorization": "Bearer " + "upk_" + "A" * 100_000}, id="100kb_api_key"),
    pytest.param({"Authorization": "Bearer " + "a" * 50_000 + "." + "b" * 50_000 + ".c"}, id="100kb_jwt"),
    pytest.param({"Authorization": "Bearer upk_\u00ff\u00fe"}, id="latin1_api_key"),
    pytest.param({"Authorization": "Bearer \u00e9.\u00e9.\u00e9"}, id="latin1_jwt"),
    pytest.param({"Authorization": "Bearer\tupk_x"}, id="tab_separator"),
    pytest.param({"Authorization": "bearer  ups_" + "0" * 64}, id="unknown_service_key"),
    pytest.param({"Authorization": "Bearer upk_" + "0" * 64 + ",Bearer x"}, id="two_credentials_comma"),
    pytest.param({"Authorization": "Bearer {ci}"[:-1]}, id="ci_key_without_last_char"),
    pytest.param({"Authorization": "Bearer {jwt_none}"}, id="jwt_alg_none_for_admin"),
    pytest.param({"Authorization": "Bearer {jwt_other_secret}"}, id="jwt_signed_with_stripe_secret"),
    pytest.param({"Authorization": "Bearer {jwt_service_role}"}, id="jwt_role_service_role"),
    pytest.param({"Authorization": "Bearer {jwt_no_sub_key_claims}"}, id="jwt_without_sub_with_key_claims"),
])
def test_hostile_credentials_are_401_json(client, conn, acme, headers):
    header = headers["Authorization"]
    now = int(time.time())
    forged = {
        "{jwt_none}": _unsigned({"sub": acme["admin"], "role": "authenticated", "aud": "authenticated",
                                 "exp": now + 600}),
        "{jwt_other_secret}": make_token(acme["admin"], secret=sf.WEBHOOK_SECRET + "-padding-to-32-bytes"),
        "{jwt_service_role}": make_token(acme["admin"], role="service_role"),
        "{jwt_no_sub_key_claims}": _no_sub_token({"role": "authenticated", "aud": "authenticated", "exp": now + 600,
                                                  "upshift": {"key_id": "x", "kind": "service"}}),
    }
    for name, token in forged.items():
        header = header.replace(name, token)
    header = header.replace("{ci}", acme["ci_key"])
    before = snapshot(conn)
    resp = client.post("/credits/consume", json={"action": "explain", "count": 1},
                       headers={"Authorization": header})
    body = refused_unchanged(conn, before, resp, 401)
    assert body["error"] == "unauthenticated"
    assert "upk_A" not in resp.get_data(as_text=True) and acme["ci_key"][:-1] not in resp.get_data(as_text=True)


def _unsigned(payload: dict[str, Any]) -> str:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


def _no_sub_token(payload: dict[str, Any]) -> str:
    import jwt

    return jwt.encode(payload, TEST_JWT_SECRET, algorithm="HS256")


@pytest.mark.parametrize(("headers", "status"), [
    pytest.param({"X-Upshift-Org": "rival"}, 403, id="org_header_rival"),
    pytest.param({"X-Upshift-Org": "x" * 10_000}, 400, id="org_header_10kb"),
    pytest.param({"X-Upshift-Org": "acme\u00e9"}, 403, id="org_header_latin1"),
    pytest.param({"X-Upshift-Org": "rival", "X-Forwarded-For": "10.0.0.1"}, 403, id="org_header_with_xff"),
    pytest.param({"Idempotency-Key": "k" * 201}, 400, id="idempotency_header_201"),
    pytest.param({"Idempotency-Key": "a", "X-Upshift-Org": "rival"}, 403, id="key_and_rival"),
    pytest.param({"X-HTTP-Method-Override": "DELETE", "X-Upshift-Org": "rival"}, 403, id="method_override"),
])
def test_hostile_context_headers_are_refused(client, conn, acme, headers, status):
    before = snapshot(conn)
    resp = client.post("/credits/consume", json={"action": "explain", "count": 1},
                       headers={**bearer(acme["member_key"]), **headers})
    refused_unchanged(conn, before, resp, status)


def test_body_and_header_idempotency_keys_must_agree(client, conn, acme):
    before = snapshot(conn)
    resp = client.post("/credits/consume", json={"action": "explain", "count": 1, "idempotency_key": "a"},
                       headers={**bearer(acme["member_key"]), "Idempotency-Key": "b"})
    refused_unchanged(conn, before, resp, 400)


def test_request_id_and_client_address_cannot_be_spoofed_into_logs_or_the_audit_trail(client, conn, acme):
    resp = client.post("/audit-events", json={"event_type": "deploy", "resource_type": "app"},
                       headers={**bearer(acme["member_key"]), "X-Request-Id": "x\u00ff<script>",
                                "X-Forwarded-For": "6.6.6.6, 7.7.7.7", "User-Agent": "U" * 100_000})
    assert resp.status_code == 201
    assert resp.headers["X-Request-Id"] != "x\u00ff<script>" and "<" not in resp.headers["X-Request-Id"]
    row = conn.execute("select host(ip) as ip, length(user_agent) as ua from public.audit_logs"
                       " where event_type = 'deploy'").fetchone()
    assert row["ip"] not in ("6.6.6.6", "7.7.7.7")  # no trusted proxy configured: the peer, not the header
    assert row["ua"] <= 512
    assert_chains_verify(conn)


# --- hostile paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    pytest.param("GET", "/api/orgs/rival", id="get_rival"),
    pytest.param("GET", "/api/orgs/rival/members", id="rival_members"),
    pytest.param("GET", "/api/orgs/..%2Frival", id="encoded_traversal"),
    pytest.param("GET", "/api/orgs/acme/../rival/members", id="dot_dot_segments"),
    pytest.param("GET", "/api/orgs/acme%2F..%2Frival/members", id="encoded_slash_traversal"),
    pytest.param("GET", "/api/orgs/acme%00/members", id="nul_in_path"),
    pytest.param("GET", "/api/orgs/%ED%A0%80", id="encoded_surrogate"),
    pytest.param("GET", "/api/orgs/" + "a" * 5000, id="5000_char_org"),
    pytest.param("GET", "/api/orgs/acme/invites", id="member_lists_invites"),
    pytest.param("PATCH", "/api/orgs/acme", id="member_renames"),
    pytest.param("PATCH", "/api/orgs/acme/members/{member}", id="member_promotes_self"),
    pytest.param("PATCH", "/api/orgs/acme/members/urn:uuid:{member}", id="member_promotes_self_urn"),
    pytest.param("PATCH", "/api/orgs/acme/members/{{{member}}}", id="member_promotes_self_braces"),
    pytest.param("DELETE", "/api/orgs/acme/members/{admin}", id="member_removes_admin"),
    pytest.param("DELETE", "/api/orgs/acme/members/..%2F..%2Fapi-keys", id="member_traversal_delete"),
    pytest.param("DELETE", "/api/orgs/rival/members/{rival_admin}", id="member_removes_rival_admin"),
    pytest.param("DELETE", "/api/api-keys/{rival_admin}", id="delete_unknown_key"),
    pytest.param("DELETE", "/api/api-keys/not-a-uuid", id="delete_key_not_uuid"),
    pytest.param("DELETE", "/api/orgs/acme/invites/00000000-0000-0000-0000-000000000000", id="revoke_invite"),
    pytest.param("PUT", "/api/orgs/acme", id="put_not_allowed"),
    pytest.param("POST", "/api/audit-logs/verify", id="post_to_verify"),
    pytest.param("GET", "/credits/consume", id="get_consume"),
    pytest.param("OPTIONS", "/credits/consume", id="options_consume"),
    pytest.param("GET", "/api/audit-logs/../../credits/consume", id="traversal_to_consume"),
    pytest.param("GET", "//api//orgs//rival", id="double_slashes"),
])
def test_hostile_paths_are_json_4xx(client, conn, acme, method, path):
    path = path.format(**acme)
    before = snapshot(conn)
    body = {"role": "admin", "name": "Pwned"} if method in ("PATCH", "PUT", "POST") else None
    resp = client.open(path, method=method, json=body, headers=bearer(acme["member_key"]))
    refused_unchanged(conn, before, resp)


# --- the checkpoint endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(("who", "qs", "status"), [
    pytest.param(None, "?org_id=acme", 401, id="anonymous"),
    pytest.param("ci_key", "?org_id=acme", 403, id="acme_ci_key"),
    pytest.param("ci_key", "", 403, id="acme_ci_key_personal"),
    pytest.param("rival_ci", "?org_id=acme", 403, id="rival_ci_key"),
    pytest.param("member_key", "?org_id=acme", 403, id="member"),
    pytest.param("rival_admin", "?org_id=acme", 403, id="rival_admin"),
    pytest.param("rival_admin", f"?org_id={'0' * 8}-0000-0000-0000-{'0' * 12}", 403, id="rival_admin_zero_uuid"),
    pytest.param("rival_admin", "?org_id=acme&org_id=rival", 403, id="rival_admin_repeated_org_id"),
    pytest.param("rival_admin", "?org_id=proorg", 403, id="pro_plan_admin"),
    pytest.param("viewer", "?org_id=acme&seq=999999", 400, id="caller_chosen_seq"),
    pytest.param("viewer", "?org_id=acme&hash=" + "f" * 64, 400, id="caller_chosen_hash"),
    pytest.param("viewer", "?org_id=acme&scope_id={rival}", 400, id="caller_chosen_scope"),
    pytest.param("viewer", "?org_id=acme&signed_at=2099-01-01T00:00:00Z", 400, id="caller_chosen_time"),
    pytest.param("viewer", "?org_id=" + "a" * 65, 400, id="org_65_chars"),
    pytest.param("viewer", "?org_id=acme%00", 400, id="org_with_nul"),
])
def test_checkpoints_are_signed_only_for_readers_and_only_of_the_real_head(client, conn, acme, who, qs, status):
    before = snapshot(conn)
    headers = {}
    if who in ("member_key", "ci_key", "rival_ci"):
        headers = bearer(acme[who])
    elif who:
        headers = bearer(make_token(acme[who]))
    resp = client.get("/api/audit-logs/checkpoint" + qs.format(**acme), headers=headers)
    refused_unchanged(conn, before, resp, status)
    assert "signature" not in resp.get_json()


@pytest.mark.parametrize(("qs", "status"), [
    pytest.param("checkpoint_seq=-1&checkpoint_hash=" + "0" * 64, 400, id="negative_seq"),
    pytest.param("checkpoint_seq=9223372036854775808&checkpoint_hash=" + "0" * 64, 400, id="seq_past_bigint"),
    pytest.param("checkpoint_seq=1e3&checkpoint_hash=" + "0" * 64, 400, id="seq_exponent"),
    pytest.param("checkpoint_seq=0x10&checkpoint_hash=" + "0" * 64, 400, id="seq_hex"),
    pytest.param("checkpoint_seq=1&checkpoint_hash=" + "\uff10" * 64, 400, id="fullwidth_hex_digits"),
    pytest.param("checkpoint_seq=1&checkpoint_hash=" + "0" * 63 + "%0A", 400, id="hash_with_newline"),
    pytest.param("checkpoint_seq=1&checkpoint_hash=" + "0" * 64 + "%00", 400, id="hash_with_nul"),
    pytest.param("checkpoint_seq=1&checkpoint_hash=' or 1=1--" + "0" * 53, 400, id="hash_sql_injection"),
    pytest.param("checkpoint_seq=1", 400, id="seq_alone"),
    pytest.param("checkpoint_hash=" + "0" * 64, 400, id="hash_alone"),
    pytest.param("checkpoint_seq=&checkpoint_hash=", 400, id="both_empty"),
    pytest.param("checkpoint_seq=1&checkpoint_hash=" + "0" * 64 + "&checkpoint_seq=2", 200, id="repeated_seq"),
])
def test_verify_checkpoint_parameters_are_checked(client, conn, acme, qs, status):
    before = snapshot(conn)
    resp = client.get(f"/api/audit-logs/verify?org_id=acme&{qs}", headers=bearer(make_token(acme["viewer"])))
    if status == 200:
        assert resp.status_code == 200 and resp.get_json()["ok"] is False  # row 1 is not the zero hash
        assert snapshot(conn) == before
    else:
        refused_unchanged(conn, before, resp, status)


def test_a_checkpoint_of_one_org_cannot_confirm_another(client, conn, acme):
    """rival's admin keeps rival's head; presented against acme (where they are no reader) or by acme's viewer
    against acme, it never confirms."""
    token = make_token(acme["rival_admin"])
    cp = client.get("/api/audit-logs/checkpoint?org_id=rival", headers=bearer(token)).get_json()
    qs = f"checkpoint_seq={cp['seq']}&checkpoint_hash={cp['hash']}"
    assert client.get(f"/api/audit-logs/verify?org_id=acme&{qs}", headers=bearer(token)).status_code == 403
    out = client.get(f"/api/audit-logs/verify?org_id=acme&{qs}", headers=bearer(make_token(acme["viewer"]))).get_json()
    assert out["ok"] is False and out["checkpoint"]["status"] in ("mismatch", "missing")


def test_a_personal_checkpoint_is_not_an_org_checkpoint(client, acme):
    """The signature binds scope_id and org_id: a member's signed personal head cannot be relabelled as acme's."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    cp = client.get("/api/audit-logs/checkpoint", headers=bearer(make_token(acme["member"]))).get_json()
    assert cp["org_id"] is None and cp["scope_id"] == acme["member"]
    pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(
        client.get("/api/audit-logs/public-key").get_json()["public_key"]))
    forged = {**cp, "org_id": acme["org"], "scope_id": acme["org"]}
    payload = json.dumps({k: forged[k] for k in ("format", "scope_id", "org_id", "seq", "hash", "signed_at",
                                                 "key_id")}, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(InvalidSignature):
        pub.verify(base64.urlsafe_b64decode(cp["signature"]), payload)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_the_public_key_endpoint_only_reads(client, conn, acme, method):
    before = snapshot(conn)
    resp = client.open("/api/audit-logs/public-key", method=method, json={"public_key": "A" * 44},
                       headers=bearer(acme["member_key"]))
    refused_unchanged(conn, before, resp, 405)
    got = client.get("/api/audit-logs/public-key", headers={"Authorization": "Bearer garbage"})
    assert got.status_code == 200
    assert set(got.get_json()) == {"key_id", "algorithm", "public_key", "public_key_pem"}
    assert "PRIVATE" not in got.get_data(as_text=True)
    assert base64.b64encode(SEED).decode() not in got.get_data(as_text=True)


# --- the Stripe webhook without the secret --------------------------------------------------------------


def _grant_event(org: str) -> dict[str, Any]:
    return {"id": "evt_forged_1", "type": "checkout.session.completed", "created": int(time.time()),
            "data": {"object": {"id": "cs_forged", "object": "checkout.session", "mode": "payment",
                                "payment_status": "paid", "payment_intent": "pi_forged", "amount_total": 0,
                                "currency": "usd", "customer": None,
                                "metadata": {"account_kind": "org", "account_id": org, "pack": "large",
                                             "credits": "1000000"}}}}


def _sig(body: str, secret: str, ts: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=ts)


WEBHOOK_ATTACKS = [
    pytest.param(lambda b: {}, id="no_signature"),
    pytest.param(lambda b: {"Stripe-Signature": ""}, id="empty_signature"),
    pytest.param(lambda b: {"Stripe-Signature": _sig(b, "whsec_guessed")}, id="wrong_secret"),
    pytest.param(lambda b: {"Stripe-Signature": _sig(b, "")}, id="empty_secret"),
    pytest.param(lambda b: {"Stripe-Signature": _sig(b + " ", sf.WEBHOOK_SECRET)}, id="signature_of_other_body"),
    pytest.param(lambda b: {"Stripe-Signature": _sig(b, sf.WEBHOOK_SECRET, int(time.time()) - 3600)},
                 id="replayed_an_hour_later"),
    pytest.param(lambda b: {"Stripe-Signature": _sig(b, sf.WEBHOOK_SECRET).replace("v1=", "v0=")}, id="v0_scheme"),
    pytest.param(lambda b: {"Stripe-Signature": f"t={int(time.time())},v1=" + "0" * 64}, id="zero_signature"),
    pytest.param(lambda b: {"Stripe-Signature": f"t={int(time.time())}"}, id="timestamp_only"),
    pytest.param(lambda b: {"Stripe-Signature": "v1=" + "0" * 64}, id="signature_only"),
    pytest.param(lambda b: {"Stripe-Signature": "t=abc,v1=" + "0" * 64}, id="timestamp_not_a_number"),
    pytest.param(lambda b: {"Stripe-Signature": "t=1e10,v1=" + "0" * 64}, id="timestamp_exponent"),
    pytest.param(lambda b: {"Stripe-Signature": "t=" + "9" * 5000 + ",v1=" + "0" * 64}, id="timestamp_5000_digits"),
    pytest.param(lambda b: {"Stripe-Signature": ",,,=,=="}, id="only_separators"),
    pytest.param(lambda b: {"Stripe-Signature": "t=1,v1=" + "0" * 64 + ",v1=" * 2000}, id="thousands_of_v1"),
    pytest.param(lambda b: {"Stripe-Signature": f"t={int(time.time())},v1=\u00e9" + "0" * 63},
                 id="non_ascii_signature"),
    pytest.param(lambda b: {"Stripe-Signature": "t=\u0661\u0662,v1=" + "0" * 64}, id="arabic_indic_timestamp"),
]


@pytest.mark.parametrize("headers", WEBHOOK_ATTACKS)
def test_a_forged_webhook_grants_nothing(client, conn, acme, headers):
    body = json.dumps(_grant_event(acme["org"]))
    before = snapshot(conn)
    resp = client.post("/stripe/webhook", data=body, headers={**JSON, **headers(body)})
    refused_unchanged(conn, before, resp, 400)


@pytest.mark.parametrize(("body", "status"), [
    pytest.param(b"\xff\xfe\x00", 400, id="not_utf8"),
    pytest.param(b"", 400, id="empty"),
    pytest.param(b"{" * 3_000_000, 413, id="3mb"),
])
def test_hostile_webhook_bodies_are_refused(client, conn, acme, body, status):
    before = snapshot(conn)
    resp = client.post("/stripe/webhook", data=body, headers={**JSON, "Stripe-Signature": "t=1,v1=00"})
    refused_unchanged(conn, before, resp, status)
