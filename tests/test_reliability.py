"""Adversarial reliability: contention, crashes mid-request, and Stripe delivering chaos."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg.rows import dict_row

from tests import stripe_fakes as sf
from tests.conftest import acting_as, claims_for, run_together, serve
from upshift_platform import embedded
from upshift_platform.app import Platform, create_wsgi_app
from upshift_platform.db import act_as
from upshift_platform.migrate import migrate
from upshift_platform.settings import Settings, StripeSettings

UPGRADE = {"event_type": "upgrade", "resource_type": "package", "resource_id": "left-pad",
           "metadata": {"from_version": "1.0.0", "to_version": "1.3.0", "outcome": "success"}}


def invariant(conn) -> None:
    assert conn.execute("select * from public.ledger_mismatches()").fetchall() == []
    assert conn.execute("select * from public.lot_mismatches()").fetchall() == []  # lots = balance
    assert conn.execute("select count(*) as n from public.credit_accounts where balance < 0").fetchone()["n"] == 0


def chains_verify(conn) -> None:
    scopes = conn.execute("select distinct scope_id, org_id from public.audit_logs").fetchall()
    for s in scopes:
        r = conn.execute("select public.admin_verify_audit_log(%s, %s) as r",
                         (str(s["org_id"]) if s["org_id"] else None, None if s["org_id"] else s["scope_id"])).fetchone()["r"]
        assert r["ok"], r


def debit_sql(cur, amount, org, key, reason="explain"):
    return cur.execute("select public.debit_credits(%s, %s, %s, %s) as r", (amount, reason, org, key)).fetchone()["r"]


# --- contention ------------------------------------------------------------------------------


def test_64_clients_with_replays_never_overdraw_or_deadlock(db_url, conn, world):
    pool_size, clients, per_client = 150, 64, 6
    org, users = world.crowd("hot", balance=pool_size, members=8)
    originals: dict[str, dict] = {}
    replays: list[tuple[str, dict]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int, c) -> None:
        user = users[i % len(users)]
        for n in range(per_client):
            # Keys are shared by the 8 clients acting as one user: the first to commit is the
            # original, the others are replays racing it.
            key = f"{user}:{n % 4}"
            amount = 1 + (n % 4)
            try:
                with acting_as(c, "authenticated", claims_for(user), commit=True) as cur:
                    r = debit_sql(cur, amount, "hot", key, reason="explain")
            except psycopg.Error as exc:
                with lock:
                    errors.append(exc.diag.sqlstate or "?")
                continue
            with lock:
                (replays.append((key, r)) if r["replayed"] else originals.setdefault(key, r))

    run_together(db_url, clients, client)
    assert set(errors) <= {"PT402"}, errors  # no deadlock (40P01), no serialization failure, nothing else
    assert "40P01" not in errors
    for key, r in replays:
        first = originals[key]
        assert r["transaction_id"] == first["transaction_id"] and r["balance"] == first["balance"]
    spent = sum(-t["amount"] for t in conn.execute(
        "select amount from public.credit_transactions where account_id = %s and amount < 0", (org,)))
    assert spent == sum(-r["amount"] for r in originals.values())
    assert conn.execute("select balance as credit_balance from public.credit_accounts where id = %s", (org,)).fetchone()[
        "credit_balance"] == pool_size - spent >= 0
    assert len(replays) > 0
    invariant(conn)
    chains_verify(conn)


# --- crash atomicity: backends terminated ----------------------------------------------------


OPS = {
    "debit": lambda cur, key: debit_sql(cur, 3, "acme", key),
    "grant": lambda cur, key: cur.execute("select public.grant_credits(7, 'admin_grant', 'acme', null, %s)", (key,)),
    "audit": lambda cur, key: cur.execute("select public.record_audit_events(%s, 'acme', %s)",
                                          (json.dumps([UPGRADE, UPGRADE]), key)),
}


def _state(conn, org):
    return conn.execute(
        "select (select balance from public.credit_accounts where id = %(o)s) as balance,"
        " (select count(*) from public.credit_transactions) as ledger,"
        " (select count(*) from public.audit_logs) + (select count(*) from private.audit_outbox) as audit,"
        " (select count(*) from public.audit_ingest_keys) as ingest_keys", {"o": org}).fetchone()


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("when", ["mid_statement", "before_commit"])
def test_terminated_backend_leaves_no_partial_write_and_retry_applies_once(db_url, conn, world, op, when):
    admin = world.user()
    org = world.org("acme", balance=50, admin=admin)
    role, claims = ("service_role", {"role": "service_role"}) if op == "grant" else (
        "authenticated", claims_for(admin))
    before = _state(conn, org)
    key = f"crash-{op}-{when}"
    victim = psycopg.connect(db_url, autocommit=True, row_factory=dict_row)
    pid = victim.info.backend_pid
    blocker = None
    if when == "mid_statement":
        # Hold the locks the operation needs, so it is killed while blocked inside the RPC.
        blocker = psycopg.connect(db_url, row_factory=dict_row)
        blocker.execute("select 1 from public.credit_accounts where id = %s for update", (org,))
        blocker.execute("select pg_advisory_xact_lock(hashtextextended('audit:' || %s, 0))", (org,))

    def run_victim():
        try:
            with victim.transaction(), victim.cursor() as cur:
                act_as(cur, role, claims)
                OPS[op](cur, key)
                if when == "before_commit":
                    cur.execute("select pg_sleep(30)")
        except psycopg.Error:
            pass

    t = threading.Thread(target=run_victim)
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until it is waiting (on the lock, or in pg_sleep)
        row = conn.execute("select wait_event_type, wait_event from pg_stat_activity where pid = %s", (pid,)).fetchone()
        if row and (row["wait_event_type"] in ("Lock", "Timeout") or row["wait_event"] == "PgSleep"):
            break
        time.sleep(0.02)
    conn.execute("select pg_terminate_backend(%s)", (pid,))
    t.join(timeout=10)
    if blocker:
        blocker.rollback()
        blocker.close()
    victim.close()
    assert _state(conn, org) == before  # nothing of the killed transaction remains
    invariant(conn)
    chains_verify(conn)
    # The client retries with the same idempotency key: applied exactly once.
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        for _attempt in range(2):
            with acting_as(c, role, claims, commit=True) as cur:
                OPS[op](cur, key)
        after = _state(conn, org)
    expected_ledger = {"debit": 1, "grant": 1, "audit": 0}[op]
    expected_audit = {"debit": 1, "grant": 1, "audit": 2}[op]
    assert after["ledger"] == before["ledger"] + expected_ledger
    assert after["audit"] == before["audit"] + expected_audit
    assert after["balance"] == before["balance"] + {"debit": -3, "grant": 7, "audit": 0}[op]
    invariant(conn)
    chains_verify(conn)


# --- crash atomicity: the HTTP server killed mid-request -------------------------------------


def _post(port, path, token, body, key):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                          "Idempotency-Key": key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def test_http_server_killed_mid_request_then_retries_apply_once(db_url, conn, world):
    admin = world.user()
    org = world.org("acme", balance=10_000, admin=admin)
    token = world.key(admin, kind="service", org=org)["secret"]
    proc, port = serve(db_url, workers=2)
    keys = [f"job-{i}" for i in range(400)]
    stop = threading.Event()
    sent: set[str] = set()

    def client(offset: int) -> None:
        for key in keys[offset::8]:
            if stop.is_set():
                return
            sent.add(key)
            try:
                _post(port, "/credits/consume", token, {"action": "fix", "count": 3}, key)
                _post(port, "/audit-events", token, {**UPGRADE, "org_id": "acme"}, key)
            except (OSError, urllib.error.HTTPError, http.client.HTTPException):
                return  # the server died mid-request (reset, or a response cut short): fate unknown

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # master and workers, mid-request
    stop.set()
    for t in threads:
        t.join()
    proc.wait()
    invariant(conn)
    chains_verify(conn)
    proc, port = serve(db_url, workers=2)
    try:
        for key in sorted(sent):  # every request whose fate the client does not know is retried
            assert _post(port, "/credits/consume", token, {"action": "fix", "count": 3}, key)[0] == 200
            assert _post(port, "/audit-events", token, {**UPGRADE, "org_id": "acme"}, key)[0] == 201
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    per_key = conn.execute("select idempotency_key, count(*) as n from public.credit_transactions"
                           " where account_id = %s and amount < 0 group by 1", (org,)).fetchall()
    assert {r["idempotency_key"] for r in per_key} == sent and all(r["n"] == 1 for r in per_key)
    assert conn.execute("select count(*) as n from public.audit_logs where event_type = 'upgrade'").fetchone()[
        "n"] == len(sent)
    invariant(conn)
    chains_verify(conn)


# --- crash atomicity: the database server killed mid-transaction ------------------------------


def test_postgres_killed_mid_load_recovers_consistent(tmp_path_factory):
    """SIGKILL the postmaster of a dedicated embedded server (real durability settings) under load."""
    data_dir = tmp_path_factory.mktemp("crash") / "pg"
    srv = embedded.up(data_dir, embedded.free_port())
    try:
        migrate(srv.url, log=lambda _m: None)
        with psycopg.connect(srv.url, autocommit=True, row_factory=dict_row) as c:
            admin = str(c.execute("insert into auth.users (email) values ('crash@x.test') returning id").fetchone()["id"])
            c.execute("select public.admin_create_org('Acme', 'acme', 'team', %s)", (admin,))
            c.execute("select public.grant_credits(100000, 'admin_grant', 'acme', null, 'seed')")
        done: dict[str, int] = {}
        stop = threading.Event()

        def worker(i: int) -> None:
            n = 0
            try:
                with psycopg.connect(srv.url, autocommit=True, row_factory=dict_row) as c:
                    while not stop.is_set():
                        key = f"w{i}-{n}"
                        with acting_as(c, "authenticated", claims_for(admin), commit=True) as cur:
                            debit_sql(cur, 1, "acme", key)
                            cur.execute("select public.record_audit_events(%s, 'acme', %s)",
                                        (json.dumps([UPGRADE]), key))
                        done[key] = 1
                        n += 1
            except psycopg.Error:
                return

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        pid = int((srv.data_dir / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 10
        while embedded._port_taken(srv.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        (srv.data_dir / "postmaster.pid").unlink(missing_ok=True)
        srv = embedded.up(data_dir, srv.port)  # crash recovery replays the WAL
        with psycopg.connect(srv.url, autocommit=True, row_factory=dict_row) as c:
            invariant(c)
            chains_verify(c)
            keys = {r["idempotency_key"] for r in c.execute(
                "select idempotency_key from public.credit_transactions where amount < 0")}
            assert set(done) <= keys  # every acknowledged commit survived
            ingest = {r["idempotency_key"] for r in c.execute("select idempotency_key from public.audit_ingest_keys")}
            assert keys == ingest  # debit and its audit event committed together or not at all
            assert len(done) > 10
    finally:
        srv.destroy()


# --- webhook chaos ---------------------------------------------------------------------------


def _scenario(org: str, user: str, other_user: str) -> list[dict]:
    t0 = int(time.time()) - 3600
    return [
        sf.checkout_completed("cs_a", "org", org, credits=300, pack="medium", payment_intent="pi_a", created=t0),
        sf.checkout_completed("cs_b", "user", user, credits=100, payment_intent="pi_b", payment_status="unpaid",
                              created=t0 + 1),
        sf.checkout_completed("cs_b", "user", user, credits=100, payment_intent="pi_b",
                              type_="checkout.session.async_payment_succeeded", created=t0 + 60),
        sf.charge_refunded("ch_a", "pi_a", amount=1500, refunded=500, created=t0 + 100),
        sf.charge_refunded("ch_a", "pi_a", amount=1500, refunded=1000, created=t0 + 200),
        sf.checkout_completed("cs_c", "user", other_user, credits=1000, pack="large", payment_intent="pi_c",
                              created=t0 + 5),
        sf.dispute("charge.dispute.created", "dp_c", "pi_c", created=t0 + 300),
        sf.dispute("charge.dispute.closed", "dp_c", "pi_c", status="won", created=t0 + 400),
        sf.subscription_event("customer.subscription.created", "sub_u", "user", user, "pro", "incomplete",
                              created=t0 + 10),
        sf.subscription_event("customer.subscription.updated", "sub_u", "user", user, "pro", "active",
                              created=t0 + 10),
        sf.invoice_paid("in_u1", "sub_u", "user", user, "pro", created=t0 + 11),
        sf.invoice_paid("in_u2", "sub_u", "user", user, "pro", billing_reason="subscription_cycle", created=t0 + 500),
        sf.subscription_event("customer.subscription.created", "sub_t", "org", org, "team", "active", created=t0 + 20),
        sf.invoice_paid("in_t1", "sub_t", "org", org, "team", created=t0 + 21),
        sf.subscription_event("customer.subscription.deleted", "sub_t", "org", org, "team", "canceled",
                              created=t0 + 900),
        sf.subscription_event("customer.subscription.updated", "sub_t", "org", org, "team", "past_due",
                              created=t0 + 800),
    ]


def _final(db_url) -> dict:
    with psycopg.connect(db_url, row_factory=dict_row) as c:
        return {
            "orgs": c.execute("select o.slug, o.plan, a.balance as credit_balance from public.orgs o join public.credit_accounts a on a.id = o.id order by o.slug").fetchall(),
            "profiles": c.execute("select p.email, p.plan, a.balance as credit_balance from public.profiles p join public.credit_accounts a on a.id = p.id order by p.email").fetchall(),
            # Grants (purchases, plan credits, signup) must match row for row: one per Stripe object.
            # Take-backs are compared as their net per account: charge.refunded carries the cumulative
            # refunded amount, so "1000 refunded" overtaking "500 refunded" takes back in one row what
            # two took in order, and a dispute closed as won before its "created" arrives takes back
            # and restores nothing where in order it takes back and restores the same amount.
            "ledger": c.execute(
                "select account_id::text, actor_user_id::text, case when reason in ('refund', 'refund_reversal') then 'reversal'"
                " else reason end as kind, sum(amount) as net,"
                " count(*) filter (where reason not in ('refund', 'refund_reversal')) as grant_rows"
                " from public.credit_transactions group by 1, 2, 3"
                " having sum(amount) <> 0 or count(*) filter (where reason not in ('refund', 'refund_reversal')) > 0"
                " order by 1, 2, 3").fetchall(),
            "subscriptions": c.execute("select id, status from public.subscriptions order by id").fetchall(),
        }


def _clone(pg_server_url, template_db, name):
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'create database "{name}" template "{template_db}"')
    from urllib.parse import urlparse
    return urlparse(pg_server_url)._replace(path=f"/{name}").geturl()


def _platform(url):
    cfg = StripeSettings(secret_key=sf.SECRET_KEY, webhook_secret=sf.WEBHOOK_SECRET, prices=dict(sf.PRICES))
    return Platform(Settings(database_url=url, jwt_secret="x" * 40, pool_max=8, stripe=cfg))


def _seed(url):
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as c:
        ids = {}
        for email in ("u1@x.test", "u2@x.test", "admin@x.test"):
            ids[email] = str(c.execute("insert into auth.users (id, email) values (%s, %s) returning id",
                                       (str(uuid.uuid5(uuid.NAMESPACE_DNS, email)), email)).fetchone()["id"])
        org = c.execute("insert into public.orgs (id, slug, name) values (%s, 'acme', 'Acme') returning id",
                        (str(uuid.uuid5(uuid.NAMESPACE_DNS, "acme")),)).fetchone()["id"]
        return str(org), ids


@pytest.mark.parametrize("seed", range(1, 9))
def test_webhook_chaos_equals_in_order_delivery(pg_server_url, template_db, seed):
    from tests.conftest import RUN_ID

    calm_url = _clone(pg_server_url, template_db, f"upshift_test_{RUN_ID}_calm{seed}")
    wild_url = _clone(pg_server_url, template_db, f"upshift_test_{RUN_ID}_wild{seed}")
    org, ids = _seed(calm_url)
    assert _seed(wild_url) == (org, ids)
    events = _scenario(org, ids["u1@x.test"], ids["u2@x.test"])
    calm, wild = _platform(calm_url), _platform(wild_url)
    try:
        calm_client = create_wsgi_app(calm).test_client()
        for e in sorted(events, key=lambda e: e["created"]):
            body, headers = sf.signed(e)
            assert calm_client.post("/stripe/webhook", data=body, headers=headers).status_code == 200
        rng = random.Random(seed)
        deliveries = [e for e in events for _ in range(rng.randint(1, 3))]
        rng.shuffle(deliveries)
        wild_app = create_wsgi_app(wild)
        statuses: dict[int, int] = defaultdict(int)

        failures = []

        def deliver(e):
            body, headers = sf.signed(e)
            resp = wild_app.test_client().post("/stripe/webhook", data=body, headers=headers)
            statuses[resp.status_code] += 1
            if resp.status_code != 200:
                failures.append((e["type"], resp.get_json()))

        for i in range(0, len(deliveries), 6):  # batches of up to 6 concurrent deliveries
            batch = deliveries[i:i + 6]
            with ThreadPoolExecutor(len(batch)) as pool:
                list(pool.map(deliver, batch))
        assert set(statuses) == {200}, failures
        assert _final(wild_url) == _final(calm_url)
        with psycopg.connect(wild_url, row_factory=dict_row) as c:
            invariant(c)
            chains_verify(c)
    finally:
        calm.close()
        wild.close()
