"""Authentication: every token kind the platform accepts and every one it rejects."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import TEST_JWT_SECRET, bearer, make_token
from upshift_platform.app import Platform, create_wsgi_app
from upshift_platform.settings import Settings

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_PUBLIC_PEM = EC_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def jwk(key, kid: str, alg: str) -> dict:
    data = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


class JwksServer:
    """A local stand-in for ``$SUPABASE_URL/auth/v1/.well-known/jwks.json`` that counts fetches."""

    def __init__(self) -> None:
        self.keys = [jwk(EC_KEY, "ec-1", "ES256"), jwk(RSA_KEY, "rsa-1", "RS256")]
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200 if self.path == "/auth/v1/.well-known/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def jwks_server():
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture
def jwks(jwks_server):
    jwks_server.keys = [jwk(EC_KEY, "ec-1", "ES256"), jwk(RSA_KEY, "rsa-1", "RS256")]
    jwks_server.fetches = 0
    return jwks_server


@pytest.fixture
def client(db_url, jwks):
    settings = Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET, supabase_url=jwks.url,
                        jwks_url=f"{jwks.url}/auth/v1/.well-known/jwks.json", pool_max=2)
    plat = Platform(settings)
    yield create_wsgi_app(plat).test_client()
    plat.close()


def claims(sub: str, **extra) -> dict:
    now = int(time.time())
    return {"sub": sub, "role": "authenticated", "aud": "authenticated", "iat": now, "exp": now + 600, **extra}


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
def user(world):
    return world.user("caller@example.test")


# --- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda sub: make_token(sub), id="hs256_project_secret"),
        pytest.param(lambda sub: jwt.encode(claims(sub), EC_KEY, "ES256", headers={"kid": "ec-1"}),
                     id="es256_jwks"),
        pytest.param(lambda sub: jwt.encode(claims(sub), RSA_KEY, "RS256", headers={"kid": "rsa-1"}),
                     id="rs256_jwks"),
        pytest.param(lambda sub: make_token(sub, ttl=-10), id="expired_within_leeway"),
    ],
)
def test_accepted_access_tokens(client, user, make):
    resp = client.get("/api/me", headers=bearer(make(user)))
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["id"] == user


def test_personal_api_key_acts_as_its_user(client, world, user):
    key = world.key(user)
    assert key["secret"].startswith("upk_") and len(key["secret"]) >= 4 + 32
    resp = client.get("/api/me", headers=bearer(key["secret"]))
    assert resp.status_code == 200
    assert resp.get_json()["id"] == user


def test_service_key_acts_as_service_actor_not_user(client, world, user):
    org = world.org("acme", admin=user)
    key = world.key(user, kind="service", org=org)
    assert key["secret"].startswith("ups_")
    resp = client.get("/api/me", headers=bearer(key["secret"]))
    assert resp.status_code == 200
    body = resp.get_json()
    assert "id" not in body
    assert body["service_key"]["id"] == key["id"]
    assert body["service_key"]["org"]["slug"] == "acme"
    assert body["service_key"]["org"]["role"] == "service"
    # A service actor is not a user: it cannot create orgs.
    resp = client.post("/api/orgs", json={"name": "X", "slug": "x"}, headers=bearer(key["secret"]))
    assert resp.status_code == 403
    assert resp.get_json()["error"] == "user_required"


def test_unknown_kid_refetches_jwks_once(client, jwks, user):
    token = jwt.encode(claims(user), EC_KEY, "ES256", headers={"kid": "ec-1"})
    assert client.get("/api/me", headers=bearer(token)).status_code == 200
    fetched = jwks.fetches
    assert client.get("/api/me", headers=bearer(token)).status_code == 200
    assert jwks.fetches == fetched  # cached
    new_key = ec.generate_private_key(ec.SECP256R1())
    jwks.keys.append(jwk(new_key, "ec-2", "ES256"))
    rotated = jwt.encode(claims(user), new_key, "ES256", headers={"kid": "ec-2"})
    assert client.get("/api/me", headers=bearer(rotated)).status_code == 200
    assert jwks.fetches == fetched + 1


# --- rejected -------------------------------------------------------------------------------


def _alg_none(sub: str) -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims(sub))}."


def _hs256_with_public_key(sub: str) -> str:
    # Algorithm confusion: HMAC keyed with the public key. PyJWT refuses to sign with a PEM,
    # so build the token by hand.
    import hashlib
    import hmac

    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'ec-1'})}.{b64(claims(sub))}"
    sig = hmac.new(EC_PUBLIC_PEM, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def _tampered(sub: str) -> str:
    header, _payload, sig = make_token(sub).split(".")
    other = claims("00000000-0000-4000-8000-000000000000")
    return f"{header}.{b64(other)}.{sig}"


def _no_claim(name: str):
    def make(sub: str) -> str:
        c = claims(sub)
        del c[name]
        return jwt.encode(c, TEST_JWT_SECRET, "HS256")
    return make


REJECTED = [
    pytest.param(None, "Missing Authorization", id="no_header"),
    pytest.param(lambda s: "Basic dXNlcjpwYXNz", "Malformed Authorization", id="basic_scheme"),
    pytest.param(lambda s: "Bearer", "Malformed Authorization", id="bearer_without_token"),
    pytest.param(lambda s: "Bearer a b", "Malformed Authorization", id="two_tokens"),
    pytest.param(lambda s: "Bearer not-a-token", "Unrecognised token", id="garbage"),
    pytest.param(lambda s: "Bearer upk_" + "0" * 64, "Unknown API key", id="unknown_api_key"),
    pytest.param(lambda s: "Bearer eyJ.x.y", "Malformed access token", id="malformed_jwt"),
    pytest.param(lambda s: f"Bearer {make_token(s, secret='wrong-secret-0123456789abcdef0123')}",
                 "signature is invalid", id="bad_signature"),
    pytest.param(lambda s: f"Bearer {_alg_none(s)}", "Unsupported access token algorithm", id="alg_none"),
    pytest.param(lambda s: f"Bearer {_hs256_with_public_key(s)}", "signature is invalid",
                 id="hs256_signed_with_public_key"),
    pytest.param(lambda s: f"Bearer {make_token(s, aud='anon')}", "audience", id="wrong_audience"),
    pytest.param(lambda s: f"Bearer {make_token(s, ttl=-3600)}", "expired", id="expired"),
    pytest.param(lambda s: f"Bearer {make_token(s, nbf=int(time.time()) + 3600)}", "not valid yet",
                 id="not_yet_valid"),
    pytest.param(lambda s: f"Bearer {_no_claim('sub')(s)}", "'sub'", id="missing_sub"),
    pytest.param(lambda s: f"Bearer {_no_claim('exp')(s)}", "'exp'", id="missing_exp"),
    pytest.param(lambda s: f"Bearer {_tampered(s)}", "signature is invalid", id="tampered_payload"),
    pytest.param(lambda s: f"Bearer {make_token(s, role='service_role')}", "role", id="service_role_claim"),
    # Supabase always sets ``role``: a token without one is refused, however well signed.
    pytest.param(lambda s: f"Bearer {_no_claim('role')(s)}", "lacks the 'role' claim", id="missing_role"),
    pytest.param(lambda s: f"Bearer {make_token(s, role=None)}", "lacks the 'role' claim", id="null_role"),
    pytest.param(lambda s: "Bearer " + jwt.encode({k: v for k, v in claims(s).items() if k != "role"}, EC_KEY,
                                                  "ES256", headers={"kid": "ec-1"}),
                 "lacks the 'role' claim", id="missing_role_es256"),
    pytest.param(lambda s: f"Bearer {make_token(s, role='anon')}", "role must be 'authenticated'", id="anon_role"),
    pytest.param(lambda s: f"Bearer {make_token(s, role='')}", "role must be 'authenticated'", id="empty_role"),
    pytest.param(lambda s: f"Bearer {make_token(s, role=['authenticated'])}", "role must be 'authenticated'",
                 id="list_role"),
    pytest.param(lambda s: "Bearer " + jwt.encode(claims(s), EC_KEY, "ES256", headers={"kid": "nope"}),
                 "unknown key", id="unknown_kid"),
    pytest.param(lambda s: "Bearer " + jwt.encode(claims(s), RSA_KEY, "RS256", headers={"kid": "ec-1"}),
                 "does not match its key", id="rs256_with_ec_kid"),
    pytest.param(lambda s: "Bearer " + jwt.encode(claims(s), TEST_JWT_SECRET * 2, "HS512"),
                 "Unsupported access token algorithm", id="hs512"),
]


@pytest.mark.parametrize(("make_header", "reason"), REJECTED)
def test_rejected_tokens_are_401_json_without_echo(client, user, make_header, reason, caplog):
    header = make_header(user) if make_header else None
    headers = {"Authorization": header} if header else {}
    with caplog.at_level(logging.DEBUG):
        resp = client.get("/api/me", headers=headers)
    assert resp.status_code == 401
    body = resp.get_json()
    assert body["error"] == "unauthenticated"
    assert reason in body["message"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    if header and " " in header:
        token = header.split(" ", 1)[1]
        if len(token) > 8:
            assert token not in resp.get_data(as_text=True)
            assert token not in caplog.text


@pytest.mark.parametrize("state", ["revoked", "expired"])
def test_revoked_or_expired_key_stops_at_once(client, world, conn, user, state):
    key = world.key(user)
    assert client.get("/api/me", headers=bearer(key["secret"])).status_code == 200
    column, value = ("revoked_at", "now()") if state == "revoked" else ("expires_at", "now() - interval '1 s'")
    conn.execute(f"update public.api_keys set {column} = {value} where id = %s", (key["id"],))
    resp = client.get("/api/me", headers=bearer(key["secret"]))
    assert resp.status_code == 401
    assert resp.get_json()["message"] == f"API key is {state}."


def test_last_used_at_is_touched_at_most_once_a_minute(client, world, conn, user):
    key = world.key(user)
    client.get("/api/me", headers=bearer(key["secret"]))
    first = conn.execute("select last_used_at from public.api_keys where id = %s", (key["id"],)).fetchone()
    assert first["last_used_at"] is not None
    client.get("/api/me", headers=bearer(key["secret"]))
    again = conn.execute("select last_used_at from public.api_keys where id = %s", (key["id"],)).fetchone()
    assert again == first
    conn.execute("update public.api_keys set last_used_at = now() - interval '2 minutes' where id = %s", (key["id"],))
    client.get("/api/me", headers=bearer(key["secret"]))
    later = conn.execute("select last_used_at from public.api_keys where id = %s", (key["id"],)).fetchone()
    assert later["last_used_at"] > first["last_used_at"]


def test_no_asymmetric_tokens_without_jwks(db_url, user):
    plat = Platform(Settings(database_url=db_url, jwt_secret=TEST_JWT_SECRET))
    try:
        c = create_wsgi_app(plat).test_client()
        token = jwt.encode(claims(user), EC_KEY, "ES256", headers={"kid": "ec-1"})
        resp = c.get("/api/me", headers=bearer(token))
        assert resp.status_code == 401
    finally:
        plat.close()


# --- token attacks against the money and audit endpoints -------------------------------------


@pytest.mark.parametrize(
    ("attack", "status", "code"),
    [
        pytest.param("other_orgs_service_key", 403, "org_forbidden", id="another_orgs_service_key"),
        pytest.param("other_orgs_personal_key", 403, "org_forbidden", id="another_orgs_personal_key"),
        pytest.param("revoked_key", 401, "unauthenticated", id="revoked_key"),
        pytest.param("expired_key", 401, "unauthenticated", id="expired_key"),
        pytest.param("forged_service_claims", 401, "unauthenticated", id="jwt_forging_service_key_claims"),
    ],
)
@pytest.mark.parametrize("endpoint", ["consume", "audit"])
def test_keys_cannot_reach_another_orgs_pool_or_log(client, world, conn, attack, status, code, endpoint):
    acme_admin, other_admin = world.user("a@acme.test"), world.user("a@other.test")
    acme = world.org("acme", balance=100, admin=acme_admin)
    other = world.org("other", balance=100, admin=other_admin)
    keys = {
        "other_orgs_service_key": world.key(other_admin, kind="service", org=other)["secret"],
        "other_orgs_personal_key": world.key(other_admin, org=other)["secret"],
        "revoked_key": world.key(acme_admin, org=acme)["secret"],
        "expired_key": world.key(acme_admin, org=acme)["secret"],
        "forged_service_claims": jwt.encode({**claims("00000000-0000-4000-8000-000000000000"),
                                             "upshift": {"key_id": "x", "kind": "service", "org_id": acme}},
                                            "not-the-project-secret-0123456789abcdef", "HS256"),
    }
    conn.execute("update public.api_keys set revoked_at = now() where key_prefix = %s", (keys["revoked_key"][:12],))
    conn.execute("update public.api_keys set expires_at = now() - interval '1 s' where key_prefix = %s",
                 (keys["expired_key"][:12],))
    before = conn.execute("select (select balance as credit_balance from public.credit_accounts where id = %s) as b,"
                          " (select count(*) from public.audit_logs where org_id = %s) as a", (acme, acme)).fetchone()
    if endpoint == "consume":
        resp = client.post("/credits/consume", json={"action": "explain", "count": 1, "org_id": "acme"},
                           headers=bearer(keys[attack]))
    else:
        resp = client.post("/audit-events", json={"event_type": "deploy", "resource_type": "app", "org_id": "acme"},
                           headers=bearer(keys[attack]))
    assert resp.status_code == status and resp.get_json()["error"] == code
    after = conn.execute("select (select balance as credit_balance from public.credit_accounts where id = %s) as b,"
                         " (select count(*) from public.audit_logs where org_id = %s) as a", (acme, acme)).fetchone()
    assert after == before
