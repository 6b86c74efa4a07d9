"""Who is calling: Supabase access tokens (JWT) and platform API keys.

Python authenticates (verifies a signature, hashes a key) and hands the result to Postgres as
``request.jwt.claims``; whether that caller may see or spend anything is decided there (RLS,
grants, security-definer RPCs). Tokens and keys are never logged or echoed back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import flask
import jwt

from .errors import ApiError
from .settings import Settings

API_KEY_PREFIXES = ("upk_", "ups_")
JWT_LEEWAY_SECONDS = 30
JWKS_TTL_SECONDS = 600
_ASYMMETRIC = {"ES256": "EC", "RS256": "RSA"}


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message)


def hash_api_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class JwksCache:
    """The project's signing keys, cached ~10 minutes, refetched on an unknown ``kid``."""

    def __init__(self, url: str, ttl: float = JWKS_TTL_SECONDS) -> None:
        self.url = url
        self.ttl = ttl
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = 0.0
        self._lock = threading.Lock()

    def _fetch(self) -> None:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:  # noqa: S310 (https/http url)
                data = json.loads(resp.read())
        except Exception as exc:
            raise ApiError(503, "jwks_unavailable", "Could not fetch the signing keys.") from exc
        keys = {}
        for entry in data.get("keys", []):
            try:
                keys[entry.get("kid", "")] = jwt.PyJWK(entry)
            except jwt.PyJWKError:
                continue
        self._keys = keys
        self._fetched = time.monotonic()

    def get(self, kid: str) -> jwt.PyJWK | None:
        with self._lock:
            stale = time.monotonic() - self._fetched > self.ttl
            if stale or kid not in self._keys:
                self._fetch()
            return self._keys.get(kid)


@dataclass(frozen=True)
class Credential:
    kind: str  # "jwt" | "api_key"
    claims: dict[str, Any] = field(default_factory=dict)
    key_hash: str | None = None


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.secret = settings.jwt_secret
        self.jwks = JwksCache(settings.jwks_url) if settings.jwks_url else None

    def credential(self, authorization: str | None) -> Credential:
        """Parse ``Authorization``: a JWT is fully verified here, an API key is only hashed.

        ``Router.handle`` calls this for every ``auth=True`` route before the handler runs (and so
        before the body is read): a request with no credential, a malformed one, or a JWT whose
        signature, expiry, audience or role does not hold is a 401 without its body being read.

        Whether an API key exists and is active is *not* decided here: that lookup runs inside
        the request's one database transaction (``public.api_key_claims``, sent with the request's
        first statement), because a separate round trip before every request would cost the hot
        path (``POST /credits/consume``) a second database call. The consequence is that a well-formed but
        unknown key gets its body read before it is refused; ``http.read_body`` caps that at
        ``MAX_BODY_BYTES``.
        """
        if not authorization:
            raise unauthenticated("Missing Authorization header (want: Bearer <token>).")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise unauthenticated("Malformed Authorization header (want: Bearer <token>).")
        if token.startswith(API_KEY_PREFIXES):
            return Credential("api_key", key_hash=hash_api_key(token))
        if token.count(".") == 2:
            return Credential("jwt", claims=self.verify_jwt(token))
        raise unauthenticated("Unrecognised token: neither an upshift API key nor a JWT.")

    def verify_jwt(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated("Malformed access token.") from None
        alg = header.get("alg")
        if alg == "HS256":
            if not self.secret:
                raise unauthenticated("HS256 access tokens are not accepted by this deployment.")
            key: Any = self.secret
        elif alg in _ASYMMETRIC:
            if self.jwks is None:
                raise unauthenticated(f"{alg} access tokens are not accepted by this deployment.")
            jwk = self.jwks.get(str(header.get("kid", "")))
            if jwk is None:
                raise unauthenticated("Access token signed by an unknown key (kid).")
            if jwk.key_type != _ASYMMETRIC[alg]:
                raise unauthenticated(f"Access token algorithm {alg} does not match its key.")
            key = jwk.key
        else:
            raise unauthenticated(f"Unsupported access token algorithm: {alg!r}.")
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience="authenticated",
                options={"require": ["exp", "sub", "role"]}, leeway=JWT_LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("Access token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise unauthenticated("Access token is not valid yet.") from None
        except jwt.InvalidAudienceError:
            raise unauthenticated("Access token audience is not 'authenticated'.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise unauthenticated(f"Access token lacks the {exc.claim!r} claim.") from None
        except jwt.InvalidSignatureError:
            raise unauthenticated("Access token signature is invalid.") from None
        except jwt.PyJWTError:
            raise unauthenticated("Access token is invalid.") from None
        # Supabase always sets ``role``; a token without one (refused above as a missing claim) or
        # with any other role (anon, service_role, ...) is not a signed-in user's token.
        if claims["role"] != "authenticated":
            raise unauthenticated("Access token role must be 'authenticated'.")
        return claims


@dataclass(frozen=True)
class Actor:
    """The authenticated caller as Postgres sees it."""

    claims: dict[str, Any]
    user_id: str | None
    key_id: str | None = None
    key_kind: str | None = None
    key_org_id: str | None = None

    @property
    def id(self) -> str | None:
        return self.user_id or self.key_id


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(request: flask.Request, trusted: tuple[Network, ...]) -> str | None:
    """The caller's address: the peer, or X-Forwarded-For when the peer is a trusted proxy."""
    peer = request.remote_addr
    hops = [h.strip() for h in (request.headers.get("X-Forwarded-For") or "").split(",") if h.strip()]
    chain = [*hops, peer] if peer else hops
    # Walk back from the nearest hop while it is one of our proxies.
    candidate = peer
    for hop in reversed(chain):
        candidate = hop
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            return None
        if not any(addr in net for net in trusted):
            break
    try:
        return str(ipaddress.ip_address(candidate)) if candidate else None
    except ValueError:
        return None


def request_headers(request: flask.Request, trusted: tuple[Network, ...]) -> dict[str, str]:
    """What the database sees as ``request.headers``: the user agent and the client address we resolved."""
    headers = {}
    ua = request.headers.get("User-Agent")
    if ua:
        headers["user-agent"] = ua[:512]
    ip = client_ip(request, trusted)
    if ip:
        headers["x-forwarded-for"] = ip
    return headers


def actor_from_claims(claims: dict[str, Any]) -> Actor:
    """The caller as Postgres sees it, from the claims the request acts with.

    For an API key these are what ``public.api_key_claims`` answered: a personal key acts as its
    owner (``sub``), a service key as "key X of org Y" (no ``sub``).
    """
    raw = claims.get("upshift")
    upshift: dict[str, Any] = raw if isinstance(raw, dict) else {}
    sub = claims.get("sub")
    return Actor(claims=claims, user_id=str(sub) if sub else None,
                 key_id=str(upshift["key_id"]) if upshift.get("key_id") else None,
                 key_kind=upshift.get("kind"),
                 key_org_id=str(upshift["org_id"]) if upshift.get("org_id") else None)
