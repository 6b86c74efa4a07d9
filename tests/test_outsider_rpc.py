"""An outsider attacks the database the way PostgREST exposes it: RPCs and tables, as each kind of caller.

On Supabase anything ``anon`` / ``authenticated`` can execute in ``public`` is one
``POST /rest/v1/rpc/<name>`` away, with the caller's JWT claims as ``request.jwt.claims``. Each
attack below runs in a *committed* transaction (so a success would stick), must be refused, and
must leave every balance, membership, key, invite, ledger row and audit row as it was, with the
ledger invariant intact. ``tests/test_access_matrix.py`` already covers "each role x each RPC
with ordinary arguments"; these are the tricky arguments, forged claims, lookalikes, mixed
batches and multi-step abuses.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from tests.conftest import acting_as, by_id, cases

# Insufficient privilege, the RPCs' own PT4xx answers, and data exceptions (class 22: PostgREST's 400).
REFUSED = {"42501", "PT400", "PT401", "PT402", "PT403", "PT404", "PT409", "PT413"}


# --- the world and what must not change -----------------------------------------------------------


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Everything an attack could change that matters (not last_used_at, which a real use touches)."""
    def rows(sql: str) -> list[Any]:
        return [tuple(r.values()) for r in conn.execute(sql).fetchall()]

    return {
        "orgs": rows("select id, slug, name, plan from public.orgs order by id"),
        "profiles": rows("select id, plan, default_org_id from public.profiles order by id"),
        "accounts": rows("select id, balance, stripe_customer_id from public.credit_accounts order by id"),
        "members": rows("select org_id, user_id, role from public.org_members order by org_id, user_id"),
        "keys": rows("select id, org_id, kind, user_id, revoked_at, expires_at from public.api_keys order by id"),
        "invites": rows("select id, org_id, email, role, accepted_at, revoked_at from public.org_invites order by id"),
        "ledger": rows("select id, amount, balance_after from public.credit_transactions order by id"),
        "audit": rows("select scope_id, seq, encode(hash, 'hex') from public.audit_logs order by scope_id, seq"),
        "checkpoints": rows("select scope_id, seq from public.audit_checkpoints order by scope_id"),
        "ingest_keys": rows("select actor_id, idempotency_key from public.audit_ingest_keys order by 1, 2"),
        "stripe": rows("select id from public.stripe_events order by id"),
        "payments": rows("select payment_key, credits_reversed from public.stripe_payments order by 1"),
        "subscriptions": rows("select id, status from public.subscriptions order by id"),
    }


def assert_ledger_ok(conn: psycopg.Connection[Any]) -> None:
    assert conn.execute("select * from public.ledger_mismatches()").fetchall() == []


def assert_chains_verify(conn: psycopg.Connection[Any]) -> None:
    scopes = conn.execute("select distinct scope_id from public.audit_logs").fetchall()
    for s in scopes:
        out = conn.execute("select private.verify_audit_scope(%s) as r", (s["scope_id"],)).fetchone()["r"]
        assert out["ok"], out


def claims(user: str | None = None, **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"role": "authenticated", "aud": "authenticated", **extra}
    if user:
        c["sub"] = user
    return c


@pytest.fixture
def w(world, conn):
    """acme (team, 100 credits): admin, member, viewer, CI key, a pending invite; rival (team, 50): its admin
    and CI key; a signed-in user of no org; the victim an invite is meant for (no account yet)."""
    team = world.team(balance=100)
    acme, admin, member, viewer = team["org"], team["admin"], team["member"], team["viewer"]
    rival_admin, nobody = world.user("boss@rival.test"), world.user("nobody@example.test")
    rival = world.org("rival", plan="team", balance=50, admin=rival_admin)
    acme_ci = world.key(admin, kind="service", org=acme)
    rival_ci = world.key(rival_admin, kind="service", org=rival)
    with acting_as(conn, "authenticated", claims(admin), commit=True) as cur:
        invite = cur.execute("select public.create_invite('acme', 'victim@acme.test', 'admin') as r").fetchone()["r"]
        cur.execute("select public.record_audit_events(%s::jsonb, 'acme')",
                    (json.dumps([{"event_type": "deploy", "resource_type": "app"}]),))
    with acting_as(conn, "authenticated", claims(member), commit=True) as cur:
        cur.execute("select public.debit_credits(1, 'explain', 'acme')")
    personas = {
        "anon": ("anon", {"role": "anon"}),
        "nobody": ("authenticated", claims(nobody)),
        "viewer": ("authenticated", claims(viewer)),
        "member": ("authenticated", claims(member)),
        "rival_admin": ("authenticated", claims(rival_admin)),
        "rival_ci": ("authenticated", claims(None, upshift={"key_id": rival_ci["id"], "kind": "service",
                                                             "org_id": rival})),
        "acme_ci": ("authenticated", claims(None, upshift={"key_id": acme_ci["id"], "kind": "service",
                                                            "org_id": acme})),
    }
    return {"acme": acme, "rival": rival, "admin": admin, "member": member, "viewer": viewer,
            "rival_admin": rival_admin, "nobody": nobody, "acme_ci": acme_ci, "rival_ci": rival_ci,
            "invite": invite, "personas": personas}


Params = dict[str, Any] | tuple[Any, ...] | None


def run_as(conn, role: str, c: dict[str, Any], sql: str, params: Params = None) -> psycopg.Error | Any:
    """Run ``sql`` as ``role`` with claims ``c`` in a committed transaction; the error, or the rows on success."""
    try:
        with acting_as(conn, role, c, commit=True) as cur:
            cur.execute(sql, params or {})
            return cur.fetchall() if cur.description else cur.rowcount
    except psycopg.Error as exc:
        return exc


def attack(conn, w, persona: str, sql: str, params: Params = None) -> psycopg.Error | Any:
    """``run_as`` one of ``w``'s personas."""
    return run_as(conn, *w["personas"][persona], sql, params)


def refused(result: Any, *states: str) -> None:
    assert isinstance(result, psycopg.Error), f"the attack succeeded: {result!r}"
    state = result.diag.sqlstate or ""
    allowed = set(states) or REFUSED
    assert state in allowed or (not states and state.startswith("22")), (state, result.diag.message_primary)


def refused_unchanged(conn, role: str, c: dict[str, Any], sql: str, params: Params = None,
                      states: tuple[str, ...] = ()) -> psycopg.Error:
    """``run_as`` must be ``refused`` (with one of ``states``, if given) and leave the ``snapshot`` as it was."""
    before = snapshot(conn)
    result = run_as(conn, role, c, sql, params)
    refused(result, *states)
    assert snapshot(conn) == before
    return result


def reads_nothing(result: Any) -> None:
    """A read that must not show another's rows: refused outright, or no rows."""
    if isinstance(result, psycopg.Error):
        refused(result, "42501")
    else:
        assert result == [], result


def params_for(w) -> dict[str, Any]:
    return {"acme": w["acme"], "rival": w["rival"], "admin": w["admin"], "member": w["member"],
            "viewer": w["viewer"], "nobody": w["nobody"], "rival_admin": w["rival_admin"],
            "acme_ci": w["acme_ci"]["id"], "invite_id": w["invite"]["id"], "token": w["invite"]["token"],
            "acme_upper": w["acme"].upper(), "acme_padded": f"  {w['acme']}\t"}


# --- spending credits that are not yours ----------------------------------------------------------

SPEND_ATTACKS = cases({  # {persona: {case id: sql}}
    "anon": {
        "anon_spends_acme": "select public.debit_credits(1, 'explain', 'acme')",
    },
    "nobody": {
        "nobody_spends_acme_by_id": "select public.debit_credits(1, 'explain', %(acme)s)",
        "nobody_spends_acme_by_upper_case_id": "select public.debit_credits(1, 'explain', %(acme_upper)s)",
        "nobody_spends_acme_by_padded_id": "select public.debit_credits(1, 'explain', %(acme_padded)s)",
        "nobody_spends_acme_by_odd_slug": "select public.debit_credits(1, 'explain', ' ACME ')",
    },
    "viewer": {
        "viewer_spends": "select public.debit_credits(1, 'explain', 'acme')",
        "viewer_spends_with_metadata": "select public.debit_credits(1, 'explain', 'acme', 'k-1',"
                                       " '{\"role\": \"admin\"}')",
    },
    "rival_admin": {
        "rival_admin_spends_acme": "select public.debit_credits(1, 'explain', 'acme')",
    },
    "rival_ci": {
        "rival_ci_spends_acme": "select public.debit_credits(1, 'explain', 'acme')",
        "rival_ci_spends_acme_by_id": "select public.debit_credits(1, 'explain', %(acme)s)",
    },
    "member": {
        "member_spends_zero": "select public.debit_credits(0, 'explain', 'acme')",
        "member_spends_negative": "select public.debit_credits(-100, 'explain', 'acme')",
        "member_overspends": "select public.debit_credits(101, 'explain', 'acme')",
        "member_spends_bigint_max": "select public.debit_credits(9223372036854775807, 'explain', 'acme')",
        "member_spends_bigint_min": "select public.debit_credits(-9223372036854775808, 'explain', 'acme')",
        "member_overlong_idempotency_key": "select public.debit_credits(1, 'explain', 'acme', repeat('k', 201))",
        "member_array_metadata": "select public.debit_credits(1, 'explain', 'acme', null, '[1, 2]')",
        "member_json_null_metadata": "select public.debit_credits(1, 'explain', 'acme', null, 'null'::jsonb)",
        "member_oversized_metadata": "select public.debit_credits(1, 'explain', 'acme', null,"
                                     " jsonb_build_object('pad', repeat('x', 5000)))",
        "member_drains_past_zero_in_one_statement": "select public.debit_credits(1, 'refund', 'acme', null,"
                                                    " '{}'::jsonb) from generate_series(1, 200)",
        "member_grants_itself": "select public.grant_credits(1000, 'admin_grant', 'acme', null, 'gift')",
    },
    "acme_ci": {
        "acme_ci_spends_rival": "select public.debit_credits(1, 'explain', 'rival')",
    },
})


@pytest.mark.parametrize(("persona", "sql"), SPEND_ATTACKS)
def test_spending_what_is_not_yours_is_refused(conn, w, persona, sql):
    refused_unchanged(conn, *w["personas"][persona], sql, params_for(w))
    assert_ledger_ok(conn)


@pytest.mark.parametrize("forged", by_id({
    "user_jwt_with_key_org_claim": {"upshift": {"org_id": "{acme}"}},
    "user_jwt_with_acme_service_key_claims": {"upshift": {"key_id": "{acme_ci}", "kind": "service",
                                                          "org_id": "{acme}"}},
    "user_jwt_with_app_metadata": {"app_metadata": {"org_id": "{acme}", "role": "admin"}},
    "nested_claim_name": {"request.jwt.claim.sub": "{admin}"},
}))
def test_extra_claims_in_a_users_jwt_do_not_reach_another_orgs_pool(conn, w, forged):
    """A signed-in user cannot mint claims, but Supabase custom claims / hooks might add some: none of them may
    turn a user into acme's service key or bind them to acme. The spend falls back to their own balance."""
    text = json.dumps(forged)
    for name, value in params_for(w).items():
        text = text.replace("{" + name + "}", str(value))
    c = {**claims(w["nobody"]), **json.loads(text)}
    before = snapshot(conn)
    try:
        with acting_as(conn, "authenticated", c, commit=True) as cur:
            out = cur.execute("select public.debit_credits(1, 'explain', public.resolve_org(null) ->> 'id') as r"
                              ).fetchone()["r"]
        assert out["source"] == "user" and out["org_id"] is None  # their own 10 credits, nobody else's
    except psycopg.Error as exc:
        refused(exc)
    after = snapshot(conn)
    assert after["orgs"] == before["orgs"]
    assert_ledger_ok(conn)


def test_a_service_key_claim_with_a_sub_is_the_user_not_the_key(conn, w):
    """PostgREST would pass both: with a sub present the key claims must count for nothing."""
    c = claims(w["nobody"], upshift={"key_id": w["acme_ci"]["id"], "kind": "service", "org_id": w["acme"]})
    refused_unchanged(conn, "authenticated", c, "select public.debit_credits(1, 'explain', 'acme')", states=("PT403",))


def test_an_idempotency_key_of_another_member_replays_nothing_for_you(conn, w, world):
    """Replaying someone else's key must neither return their transaction nor charge a second time."""
    second = world.user("second@acme.test")
    world.member(w["acme"], second, "member")
    with acting_as(conn, "authenticated", claims(w["member"]), commit=True) as cur:
        first = cur.execute("select public.debit_credits(3, 'fix', 'acme', 'ci-run-7') as r").fetchone()["r"]
    exc = refused_unchanged(conn, "authenticated", claims(second),
                            "select public.debit_credits(3, 'fix', 'acme', 'ci-run-7')", states=("PT409",))
    assert first["transaction_id"] not in (exc.diag.message_detail or "")


def test_a_removed_member_cannot_replay_an_old_idempotency_key(conn, w):
    with acting_as(conn, "authenticated", claims(w["member"]), commit=True) as cur:
        cur.execute("select public.debit_credits(1, 'explain', 'acme', 'before-removal')")
    with acting_as(conn, "authenticated", claims(w["admin"]), commit=True) as cur:
        cur.execute("select public.remove_member('acme', %s)", (w["member"],))
    before = snapshot(conn)
    for sql in ("select public.debit_credits(1, 'explain', 'acme', 'before-removal')",
                "select public.debit_credits(1, 'explain', 'acme', 'after-removal')",
                "select public.debit_credits(1, 'explain', %(acme)s)"):
        refused(attack(conn, w, "member", sql, params_for(w)), "PT403")
    assert snapshot(conn) == before
    assert_ledger_ok(conn)


# --- other orgs' data -------------------------------------------------------------------------------

READ_ATTACKS = [
    pytest.param(p, sql, id=f"{p}-{name}")
    for name, sql in [
        ("org_row", "select * from public.orgs where id = %(acme)s or slug = 'acme'"),
        ("members", "select * from public.org_members where org_id = %(acme)s"),
        ("admin_profile", "select * from public.profiles where id = %(admin)s"),
        ("ledger", "select * from public.credit_transactions where account_id = %(acme)s"),
        ("account", "select * from public.credit_accounts where id = %(acme)s"),
        ("keys", "select id, name from public.api_keys where org_id = %(acme)s or user_id = %(admin)s"),
        ("invites", "select id, email from public.org_invites where org_id = %(acme)s"),
        ("audit", "select * from public.audit_logs where scope_id = %(acme)s or org_id = %(acme)s"),
        ("admin_personal_audit", "select * from public.audit_logs where scope_id = %(admin)s"),
        ("subscriptions", "select * from public.subscriptions where account_id = %(acme)s"),
    ]
    for p in ("nobody", "rival_admin", "rival_ci", "acme_ci")
]


@pytest.mark.parametrize(("persona", "sql"), READ_ATTACKS)
def test_reading_another_orgs_rows_returns_nothing(conn, w, persona, sql):
    reads_nothing(attack(conn, w, persona, sql, params_for(w)))


@pytest.mark.parametrize(("persona", "sql"), cases({
    "member": {
        "member_reads_invites": "select id from public.org_invites where org_id = %(acme)s",
        "member_lists_ci_keys": "select id from public.api_keys where kind = 'service'",
        "member_reads_org_audit": "select id from public.audit_logs where org_id = %(acme)s",
        "member_reads_others_spends": "select id from public.credit_transactions where account_id = %(acme)s"
                                      " and actor_user_id is distinct from %(member)s",
        "member_reads_checkpoints": "select scope_id from public.audit_checkpoints",
        "member_reads_subscription": "select id from public.subscriptions",
    },
    "viewer": {
        "viewer_reads_invites": "select id from public.org_invites where org_id = %(acme)s",
        "viewer_lists_ci_keys": "select id from public.api_keys where kind = 'service'",
        "viewer_reads_profiles": "select id from public.profiles where id <> %(viewer)s",
    },
}))
def test_members_see_only_what_their_role_allows(conn, w, persona, sql):
    reads_nothing(attack(conn, w, persona, sql, params_for(w)))


@pytest.mark.parametrize("sql", by_id({
    "api_key_hashes": "select key_hash from public.api_keys",
    "invite_token_hashes": "select token_hash from public.org_invites",
    "api_keys_star": "select * from public.api_keys",
    "stripe_events": "select * from public.stripe_events",
    "stripe_payments": "select * from public.stripe_payments",
    "audit_ingest_keys": "select * from public.audit_ingest_keys",
    "audit_permits": "select * from private.audit_permits",
    "private_verify_any_scope": "select private.verify_audit_scope(%(acme)s)",
    "private_org_json": "select private.org_json(%(acme)s, 'admin')",
    "private_find_org": "select private.find_org('acme')",
    "auth_users": "select * from auth.users",
}))
def test_secret_columns_and_private_objects_are_closed_even_to_acmes_admin(conn, w, sql):
    w["personas"]["acme_admin"] = ("authenticated", claims(w["admin"]))
    refused(attack(conn, w, "acme_admin", sql, params_for(w)), "42501")


def test_helper_functions_policies_use_reveal_nothing_about_other_orgs(conn, w):
    """has_role_on_org / can_read_org_audit / user_org_ids are executable for RLS: they answer about the caller."""
    out = attack(conn, w, "rival_admin",
                 "select private.has_role_on_org(%(acme)s, array['admin','member','viewer']) as a,"
                 " private.can_read_org_audit(%(acme)s) as b,"
                 " (select count(*) from private.user_org_ids() u where u = %(acme)s) as c", params_for(w))
    assert out == [{"a": False, "b": False, "c": 0}]


# --- changing another org / escalating ---------------------------------------------------------------

CHANGE_ATTACKS = cases({
    "member": {
        "member_promotes_self": "select public.set_member_role('acme', %(member)s, 'admin')",
        "member_removes_admin": "select public.remove_member('acme', %(admin)s)",
        "member_renames_org": "select public.update_org('acme', 'Pwned', 'pwned')",
        "member_invites": "select public.create_invite('acme', 'sock@evil.test', 'admin')",
        "member_mints_ci_key": "select public.create_api_key('ci', 'service', 'acme')",
        "member_revokes_ci_key": "select public.revoke_api_key(%(acme_ci)s)",
        "member_revokes_invite": "select public.revoke_invite('acme', %(invite_id)s)",
        "member_buys_for_org": "select public.begin_checkout('credits', 'acme')",
        "member_upgrades_with_admin_invite": "select public.accept_invite(%(token)s)",
    },
    "viewer": {
        "viewer_promotes_self": "select public.set_member_role('acme', %(viewer)s, 'member')",
        "viewer_lists_invite_tokens": "select public.list_invites('acme')",
    },
    "rival_admin": {
        "rival_admin_joins_as_admin": "select public.set_member_role('acme', %(rival_admin)s, 'admin')",
        "rival_admin_demotes_acme_admin": "select public.set_member_role(%(acme)s, %(admin)s, 'viewer')",
        "rival_admin_removes_admin": "select public.remove_member('acme', %(admin)s)",
        "rival_admin_invites_self": "select public.create_invite('acme', 'boss@rival.test', 'admin')",
        "rival_admin_ci_key": "select public.create_api_key('ci', 'service', 'acme')",
        "rival_admin_key_bound_to_acme": "select public.create_api_key('p', 'personal', 'acme')",
        "rival_admin_revokes_acme_ci": "select public.revoke_api_key(%(acme_ci)s)",
        "rival_admin_revokes_invite": "select public.revoke_invite('acme', %(invite_id)s)",
        "rival_admin_revokes_acme_invite_via_own_org": "select public.revoke_invite('rival', %(invite_id)s)",
        "rival_admin_renames": "select public.update_org(%(acme)s, null, 'rival-owned')",
        "rival_admin_defaults_to_acme": "select public.set_default_org('acme')",
        "rival_admin_lists_members": "select public.list_members('acme')",
        "rival_admin_gets_org": "select public.get_org(%(acme)s)",
        "rival_admin_reads_balance": "select public.billing_status('acme')",
        "rival_admin_checkout_acme": "select public.begin_checkout('credits', 'acme')",
        "rival_admin_team_for_acme": "select public.begin_checkout('team', 'acme')",
        "rival_admin_accepts_victims_invite": "select public.accept_invite(%(token)s)",
    },
    "rival_ci": {
        "rival_ci_lists_members": "select public.list_members('acme')",
    },
    "acme_ci": {
        "ci_promotes": "select public.set_member_role('acme', %(member)s, 'admin')",
        "ci_removes_admin": "select public.remove_member('acme', %(admin)s)",
        "ci_removes_null_user": "select public.remove_member('acme', null)",
        "ci_mints_ci_key": "select public.create_api_key('ci2', 'service', 'acme')",
        "ci_invites": "select public.create_invite('acme', 'x@evil.test', 'admin')",
        "ci_renames": "select public.update_org('acme', 'Pwned')",
        "ci_buys": "select public.begin_checkout('credits', 'acme')",
        "ci_accepts_invite": "select public.accept_invite(%(token)s)",
        "ci_revokes_itself": "select public.revoke_api_key(%(acme_ci)s)",
    },
    "nobody": {
        "nobody_accepts_victims_invite": "select public.accept_invite(%(token)s)",
        "padded_token": "select public.accept_invite(' ' || %(token)s || E'\\n')",
        "upper_case_token": "select public.accept_invite(upper(%(token)s))",
        "token_prefix": "select public.accept_invite(left(%(token)s, 20))",
    },
    "anon": {
        "anon_accepts": "select public.accept_invite(%(token)s)",
    },
})


@pytest.mark.parametrize(("persona", "sql"), CHANGE_ATTACKS)
def test_changing_or_reading_what_is_not_yours_is_refused(conn, w, persona, sql):
    refused_unchanged(conn, *w["personas"][persona], sql, params_for(w))
    assert_ledger_ok(conn)


@pytest.mark.parametrize("email", by_id({
    "trailing_space": "victim@acme.test ",
    "cyrillic_e_homoglyph": "victim@acme.t\u0435st",
    "suffix_domain": "victim@acme.test.evil.test",
    "plus_alias": "victim+x@acme.test",
    "zero_width_space": "victim@acme.test\u200b",
    "prefix_local_part": "xvictim@acme.test",
}))
def test_an_invite_cannot_be_accepted_by_a_lookalike_email(conn, w, world, email):
    sock = world.user(email)
    refused_unchanged(conn, "authenticated", claims(sock), "select public.accept_invite(%s)", (w["invite"]["token"],),
                      states=("PT403",))


def test_an_accepted_invite_cannot_be_reused_by_a_second_account_with_the_same_email(conn, w, world):
    victim = world.user("victim@acme.test")
    with acting_as(conn, "authenticated", claims(victim), commit=True) as cur:
        cur.execute("select public.accept_invite(%s)", (w["invite"]["token"],))
    # The victim changes their email; a new account registers the invited address and tries the same token.
    conn.execute("update auth.users set email = 'moved@acme.test' where id = %s", (victim,))
    sock = world.user("victim@acme.test")
    refused_unchanged(conn, "authenticated", claims(sock), "select public.accept_invite(%s)", (w["invite"]["token"],),
                      states=("PT409",))


def test_leaving_and_rejoining_does_not_restore_an_old_role(conn, w, world):
    """A demoted admin who leaves and comes back through an old pending invite must not regain admin."""
    admin2 = world.user("admin2@acme.test")
    world.member(w["acme"], admin2, "admin")
    with acting_as(conn, "authenticated", claims(admin2), commit=True) as cur:
        token = cur.execute("select public.create_invite('acme', 'alt@evil.test', 'admin') as r"
                            ).fetchone()["r"]["token"]
    with acting_as(conn, "authenticated", claims(w["admin"]), commit=True) as cur:
        cur.execute("select public.set_member_role('acme', %s, 'viewer')", (admin2,))
    alt = world.user("alt@evil.test")
    refused_unchanged(conn, "authenticated", claims(alt), "select public.accept_invite(%s)", (token,),
                      states=("PT409",))


# --- the audit log ------------------------------------------------------------------------------------

AUDIT_ATTACKS = cases({
    "rival_admin": {
        "rival_writes_acme": "select public.record_audit_events(%(ev)s::jsonb, 'acme')",
        "rival_exports": "select public.record_audit_export(%(acme)s)",
        "rival_verifies": "select public.verify_audit_log('acme')",
        "rival_reads_head": "select public.audit_head('acme')",
        "rival_probes_checkpoint": "select public.verify_audit_checkpoint(1, repeat('0', 64), 'acme')",
    },
    "rival_ci": {
        "rival_ci_writes_acme": "select public.record_audit_events(%(ev)s::jsonb, %(acme)s)",
    },
    "viewer": {
        "viewer_writes": "select public.record_audit_events(%(ev)s::jsonb, 'acme')",
    },
    "nobody": {
        "nobody_mixed_batch": "select public.record_audit_events(%(mixed)s::jsonb)",
    },
    "member": {
        "member_mixed_batch_rival_last": "select public.record_audit_events(%(mixed_rival)s::jsonb, 'acme')",
        "member_mixed_batch_reserved_last": "select public.record_audit_events(%(mixed_reserved)s::jsonb, 'acme')",
        "member_mixed_batch_bad_timestamp_last": "select public.record_audit_events(%(bad_ts_last)s::jsonb, 'acme')",
        "member_501_events": "select public.record_audit_events(%(ev501)s::jsonb, 'acme')",
        "member_object_not_array": "select public.record_audit_events('{\"event_type\": \"deploy\"}'::jsonb, 'acme')",
        "member_empty_batch": "select public.record_audit_events('[]'::jsonb, 'acme')",
        "member_null_event": "select public.record_audit_events('[null]'::jsonb, 'acme')",
        "member_array_event": "select public.record_audit_events('[[1]]'::jsonb, 'acme')",
        "member_exports": "select public.record_audit_export('acme')",
        "member_verifies": "select public.verify_audit_log('acme')",
        "negative_checkpoint_seq": "select public.verify_audit_checkpoint(-1, repeat('0', 64), null)",
        "non_hex_checkpoint_hash": "select public.verify_audit_checkpoint(1, repeat('g', 64), null)",
        "long_checkpoint_hash": "select public.verify_audit_checkpoint(1, repeat('0', 66), null)",
        "checkpoint_hash_with_newline": "select public.verify_audit_checkpoint(1, repeat('0', 63) || E'\\n', null)",
        "null_checkpoint_seq": "select public.verify_audit_checkpoint(null, repeat('0', 64), null)",
        "member_updates": "update public.audit_logs set metadata = '{}' where org_id is null",
        "member_deletes_own": "delete from public.audit_logs where scope_id = %(member)s",
        "member_forges_retention_checkpoint": "insert into public.audit_checkpoints (scope_id, seq, hash)"
                                              " values (%(member)s, 99, '\\x00')",
    },
    "acme_ci": {
        "acme_ci_writes_rival": "select public.record_audit_events(%(ev)s::jsonb, 'rival')",
        "ci_exports": "select public.record_audit_export('acme')",
        "ci_exports_personal": "select public.record_audit_export(null)",
        "ci_reads_head": "select public.audit_head('acme')",
    },
})


def _audit_params(w) -> dict[str, Any]:
    deploy = {"event_type": "deploy", "resource_type": "app"}
    return {**params_for(w),
            "ev": json.dumps([deploy]),
            "ev501": json.dumps([deploy] * 501),
            "mixed": json.dumps([deploy, {**deploy, "org_id": "acme"}]),
            "mixed_rival": json.dumps([deploy, deploy, {**deploy, "org_id": "rival"}]),
            "mixed_reserved": json.dumps([deploy, {"event_type": "credits_granted", "resource_type": "x"}]),
            "bad_ts_last": json.dumps([deploy, {**deploy, "timestamp": "2026-02-30T25:61:00Z"}])}


@pytest.mark.parametrize(("persona", "sql"), AUDIT_ATTACKS)
def test_audit_attacks_are_refused_and_write_nothing(conn, w, persona, sql):
    refused_unchanged(conn, *w["personas"][persona], sql, _audit_params(w))
    assert_chains_verify(conn)


@pytest.mark.parametrize("event_type", by_id({
    "upper_case": "Credit_debit",
    "cyrillic_c": "\u0441redit_debit",
    "trailing_space": "credit_debit ",
    "trailing_dot": "credit_debit.",
    "exact_platform_type": "member_removed",
    "org_family": "org_deleted",
    "webhook_family": "webhook.stripe",
    "audit_family": "audit_chain_reset",
    "platform_family": "platform.notice",
    "upshift_family": "upshift_security_notice",
    "stripe_family": "stripe_refund",
    "nul_inside": "credit\u0000debit",
}))
def test_lookalike_platform_event_types_are_refused(conn, w, event_type):
    refused_unchanged(conn, *w["personas"]["member"], "select public.record_audit_events(%(ev)s::jsonb, 'acme')",
                      {"ev": json.dumps([{"event_type": event_type, "resource_type": "x"}])})


@pytest.mark.parametrize("event_type", [
    "members_removed", "membership_revoked", "organization_deleted", "orgs_updated", "creditsgranted",
    "credit2_debit", "webhooks_replayed", "invites_accepted", "apikey_revoked", "plans_changed",
])
def test_event_types_in_the_documented_reserved_families_are_refused(conn, w, event_type):
    refused_unchanged(conn, *w["personas"]["member"], "select public.record_audit_events(%(ev)s::jsonb, 'acme')",
                      {"ev": json.dumps([{"event_type": event_type, "resource_type": "user"}])}, states=("PT400",))


@pytest.mark.parametrize(("fmt", "filters"), [
    pytest.param("csv", {"note": "x" * 200_000}, id="200kb_filters"),
    pytest.param("ndjson\nmember_removed admin@acme.test", {}, id="forged_format_text"),
    pytest.param("csv", {"event_type": ["credits_granted"], "granted_by": "operator", "amount": 1_000_000},
                 id="filters_that_read_like_a_grant"),
    pytest.param("xml", [1, 2, 3], id="filters_not_an_object"),
])
def test_a_viewer_cannot_write_arbitrary_content_through_record_audit_export(conn, w, fmt, filters):
    before = snapshot(conn)
    refused(attack(conn, w, "viewer", "select public.record_audit_export('acme', %(fmt)s, %(filters)s::jsonb)",
                   {"fmt": fmt, "filters": json.dumps(filters)}), "PT400", "PT413")
    assert snapshot(conn)["audit"] == before["audit"]


def test_a_batch_that_fails_halfway_records_nothing_and_consumes_no_idempotency_key(conn, w):
    events = [{"event_type": "deploy", "resource_type": "app"}] * 3 + [{"event_type": "fix", "resource_type": "p",
                                                                        "metadata": {"applied": "yes"}}]
    refused_unchanged(conn, *w["personas"]["member"],
                      "select public.record_audit_events(%(ev)s::jsonb, 'acme', 'batch-1')", {"ev": json.dumps(events)},
                      states=("PT400",))
    # The same key then works for a valid batch: the failed attempt did not burn it.
    with acting_as(conn, "authenticated", claims(w["member"]), commit=True) as cur:
        out = cur.execute("select public.record_audit_events(%s::jsonb, 'acme', 'batch-1') as r",
                          (json.dumps(events[:3]),)).fetchone()["r"]
    assert out["replayed"] is False and out["count"] == 3


def test_an_audit_idempotency_key_is_per_actor(conn, w):
    """Another actor reusing my key neither sees my result nor blocks me, and cannot inject into my scope."""
    body = json.dumps([{"event_type": "deploy", "resource_type": "app"}])
    with acting_as(conn, "authenticated", claims(w["member"]), commit=True) as cur:
        mine = cur.execute("select public.record_audit_events(%s::jsonb, 'acme', 'k') as r", (body,)).fetchone()["r"]
    with acting_as(conn, "authenticated", claims(w["rival_admin"]), commit=True) as cur:
        theirs = cur.execute("select public.record_audit_events(%s::jsonb, 'rival', 'k') as r", (body,)
                             ).fetchone()["r"]
    assert theirs["replayed"] is False
    assert theirs["events"][0]["scope_id"] == w["rival"] != mine["events"][0]["scope_id"]
    assert_chains_verify(conn)
