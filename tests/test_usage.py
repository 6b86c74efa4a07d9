"""GET /api/orgs/{org}/usage and public.org_usage: spends summed per day and actor, under the ledger's rule.

Admins and viewers see every spend of the org, a member the spends they made, an org service key its
own; anyone else gets 403 org_forbidden. Ranges and groups are checked by the database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import bearer, make_token


@pytest.fixture
def spent(world, conn, client):
    """acme (Team, 100 credits): the member spends 1+3, the admin 2, the CI key 3; the member's first spend
    is moved to three days ago (as the owner: the ledger has no guard against it)."""
    acme = world.team(balance=100, outsider=True)
    ci = world.key(acme["admin"], kind="service", org=acme["org"], name="GitHub Actions")
    for who, action, count in (("member", "explain", 1), ("member", "fix", 3), ("admin", "audit", 2)):
        resp = client.post("/credits/consume", json={"action": action, "count": count, "org_id": "acme"},
                           headers=bearer(make_token(acme[who])))
        assert resp.status_code == 200, resp.get_json()
    resp = client.post("/credits/consume", json={"action": "fix", "count": 3}, headers=bearer(ci["secret"]))
    assert resp.status_code == 200, resp.get_json()
    conn.execute("update public.credit_transactions set created_at = now() - interval '3 days'"
                 " where actor_user_id = %s and amount = -1", (acme["member"],))
    return {**acme, "ci": ci}


def usage(client, token: str, org: str = "acme", **params: str):
    return client.get(f"/api/orgs/{org}/usage", query_string=params, headers=bearer(token))


def by_actor(body) -> dict[str, int]:
    return {row.get("user_id") or row.get("service_key_id") or "system": row["spent"] for row in body["data"]}


@pytest.mark.parametrize("role", ["admin", "viewer"])
def test_admins_and_viewers_see_every_spend(client, spent, role):
    resp = usage(client, make_token(spent[role]), group_by="actor")
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["scope"] == "org" and body["role"] == role and body["org_slug"] == "acme"
    assert by_actor(body) == {spent["member"]: 4, spent["admin"]: 2, spent["ci"]["id"]: 3}
    assert body["total_spent"] == 9
    kinds = {row.get("user_id") or row.get("service_key_id"): row["actor_kind"] for row in body["data"]}
    assert kinds[spent["ci"]["id"]] == "service_key" and kinds[spent["member"]] == "user"
    labels = {a["id"]: a["label"] for a in body["actors"]}
    assert labels == {spent["member"]: "member@acme.test", spent["admin"]: "admin@acme.test",
                      spent["ci"]["id"]: "GitHub Actions"}


def test_a_member_sees_only_their_own_spends(client, spent):
    body = usage(client, make_token(spent["member"]), group_by="actor").get_json()
    assert body["scope"] == "own"
    assert by_actor(body) == {spent["member"]: 4}
    assert [a["id"] for a in body["actors"]] == [spent["member"]]


def test_a_service_key_sees_only_its_own_spends(client, spent):
    body = usage(client, spent["ci"]["secret"], group_by="actor").get_json()
    assert body["scope"] == "own" and body["role"] == "service"
    assert by_actor(body) == {spent["ci"]["id"]: 3}


@pytest.mark.parametrize("who", ["outsider", "stranger"])
def test_outsiders_are_refused(client, world, spent, who):
    user = spent["outsider"] if who == "outsider" else world.user()
    resp = usage(client, make_token(user))
    assert resp.status_code == 403 and resp.get_json()["error"] == "org_forbidden"
    assert usage(client, make_token(user), org="no-such-org").get_json()["error"] == "org_forbidden"


def test_days_and_actors(client, spent):
    body = usage(client, make_token(spent["admin"])).get_json()  # default: the last 30 days, by day and actor
    assert body["group_by"] == ["day", "actor"]
    today = datetime.now(UTC).date()
    rows = {(r["day"], r.get("user_id") or r.get("service_key_id")): r["spent"] for r in body["data"]}
    assert rows[((today - timedelta(days=3)).isoformat(), spent["member"])] == 1
    member_today = [v for (day, who), v in rows.items() if who == spent["member"] and day != str(today - timedelta(3))]
    assert member_today == [3]
    by_day = usage(client, make_token(spent["admin"]), group_by="day").get_json()
    assert [set(r) for r in by_day["data"]] == [{"day", "spent", "spends"}] * 2
    assert sum(r["spent"] for r in by_day["data"]) == 9
    total = usage(client, make_token(spent["admin"]), group_by="").get_json()
    assert total["data"] == [{"spent": 9, "spends": 4}] and total["group_by"] == []


def test_the_range_is_half_open_and_bounded(client, spent):
    token = make_token(spent["admin"])
    now = datetime.now(UTC)
    body = usage(client, token, **{"from": (now - timedelta(days=2)).isoformat(), "to": now.isoformat()}).get_json()
    assert body["total_spent"] == 8  # the member's spend of three days ago is outside
    body = usage(client, token, **{"from": (now - timedelta(days=10)).isoformat(),
                                   "to": (now - timedelta(days=2)).isoformat()}).get_json()
    assert body["total_spent"] == 1


@pytest.mark.parametrize(("params", "code", "field"), [
    pytest.param({"group_by": "day,member"}, "invalid_group_by", "group_by", id="unknown_group"),
    pytest.param({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "invalid_range", "from",
                 id="backwards"),
    pytest.param({"from": "2024-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "invalid_range", "from",
                 id="too_long"),
    pytest.param({"from": "yesterday"}, "invalid_request", "from", id="not_a_time"),
    pytest.param({"since": "2026-01-01T00:00:00Z"}, "invalid_request", "since", id="unknown_parameter"),
])
def test_bad_ranges_and_groups_are_400(client, spent, params, code, field):
    resp = usage(client, make_token(spent["admin"]), **params)
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"] == code and resp.get_json()["field"] == field


def test_the_usage_rule_holds_for_rpc_callers_too(as_role, spent):
    with as_role("authenticated", spent["member"]) as cur:
        body = cur.execute("select public.org_usage('acme', group_by => 'actor') as u").fetchone()["u"]
    assert body["scope"] == "own" and [r["user_id"] for r in body["data"]] == [spent["member"]]
