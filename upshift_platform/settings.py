"""Settings, read once from the environment into a typed object.

A missing required value fails loudly at startup, not on the first request.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from .signing import AuditSigningKey, SigningKeyError


class SettingsError(RuntimeError):
    pass


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc
    if value < 1.0:
        raise SettingsError(f"{name} must be at least 1.0, got {raw!r}")
    return value


def _prices(raw: str | None) -> dict[str, int] | None:
    """``UPSHIFT_PRICES="explain=1,fix=3,audit=2"`` (unset: the database's prices stay as they are)."""
    if not raw:
        return None
    prices: dict[str, int] = {}
    for item in raw.split(","):
        name, _, value = item.partition("=")
        if not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise SettingsError(f"UPSHIFT_PRICES: bad entry {item!r} (want action=positive_int)")
        prices[name.strip()] = int(value)
    return prices


PACKS = ("small", "medium", "large")
TIERS = ("pro", "team")


@dataclass(frozen=True)
class StripeSettings:
    """Stripe configuration. Anything missing makes the endpoints that need it answer 503."""

    secret_key: str | None = None
    webhook_secret: str | None = None
    prices: dict[str, str] = field(default_factory=dict)  # small/medium/large/pro/team -> price id
    api_base: str | None = None
    pack_credits: dict[str, int] = field(default_factory=lambda: {"small": 100, "medium": 300, "large": 1000})
    plan_credits: dict[str, int] = field(default_factory=lambda: {"pro": 100, "team": 1000})

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StripeSettings:
        prices = {name: env[f"STRIPE_PRICE_{name.upper()}"] for name in TIERS
                  if env.get(f"STRIPE_PRICE_{name.upper()}")}
        prices |= {name: env[f"STRIPE_PRICE_PACK_{name.upper()}"] for name in PACKS
                   if env.get(f"STRIPE_PRICE_PACK_{name.upper()}")}
        return cls(
            secret_key=env.get("STRIPE_SECRET_KEY") or None,
            webhook_secret=env.get("STRIPE_WEBHOOK_SECRET") or None,
            prices=prices,
            api_base=(env.get("STRIPE_API_BASE") or "").rstrip("/") or None,
            pack_credits={p: _int(env, f"UPSHIFT_PACK_CREDITS_{p.upper()}", d)
                          for p, d in (("small", 100), ("medium", 300), ("large", 1000))},
            plan_credits={"pro": _int(env, "UPSHIFT_PRO_MONTHLY_CREDITS", 100),
                          "team": _int(env, "UPSHIFT_TEAM_MONTHLY_CREDITS", 1000)},
        )

    def fulfilment_config(self) -> dict[str, object]:
        """What the database needs to apply events: credits per pack and plan, price -> tier."""
        return {
            "pack_credits": self.pack_credits,
            "plan_credits": self.plan_credits,
            "price_tiers": {price: tier for tier, price in self.prices.items() if tier in TIERS},
        }


@dataclass(frozen=True)
class Settings:
    database_url: str
    jwt_secret: str | None = None
    supabase_url: str | None = None
    supabase_anon_key: str | None = None  # public by design: the console's Supabase Auth sign-in uses it
    jwks_url: str | None = None
    pool_min: int = 1
    pool_max: int = 10
    statement_timeout_ms: int = 5000
    pool_timeout_s: float = 5.0  # the longest a request waits for a pooled connection before a 503
    # UPSHIFT_PRICES: applied to the credit_prices table when the platform starts; None leaves it as it is.
    prices: dict[str, int] | None = None
    trusted_proxies: tuple[str, ...] = ()
    public_base_url: str | None = None
    bonus_multiplier: float = 1.0
    stripe: StripeSettings = field(default_factory=StripeSettings)
    audit_signing_key: AuditSigningKey | None = None  # unset: the checkpoint endpoints answer 503

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return _networks(self.trusted_proxies)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        url = env.get("DATABASE_URL")
        if not url:
            raise SettingsError(
                "DATABASE_URL is not set (run `upshift-platform db up` for a local database)"
            )
        supabase_url = env.get("SUPABASE_URL") or None
        jwks = env.get("SUPABASE_JWKS_URL") or (
            f"{supabase_url.rstrip('/')}/auth/v1/.well-known/jwks.json" if supabase_url else None
        )
        proxies = tuple(p.strip() for p in env.get("UPSHIFT_TRUSTED_PROXIES", "").split(",") if p.strip())
        _networks(proxies)  # fail at startup on a bad entry
        secret = env.get("SUPABASE_JWT_SECRET") or None
        if not secret and not jwks:
            raise SettingsError("set SUPABASE_JWT_SECRET and/or SUPABASE_URL to verify access tokens")
        return cls(
            database_url=url,
            jwt_secret=secret,
            supabase_url=supabase_url,
            supabase_anon_key=env.get("SUPABASE_ANON_KEY") or None,
            jwks_url=jwks,
            pool_min=_int(env, "UPSHIFT_DB_POOL_MIN", 1),
            pool_max=_int(env, "UPSHIFT_DB_POOL_MAX", 10),
            statement_timeout_ms=_int(env, "UPSHIFT_STATEMENT_TIMEOUT_MS", 5000),
            pool_timeout_s=_int(env, "UPSHIFT_DB_POOL_TIMEOUT_MS", 5000) / 1000,
            prices=_prices(env.get("UPSHIFT_PRICES")),
            trusted_proxies=proxies,
            public_base_url=(env.get("UPSHIFT_PUBLIC_BASE_URL") or "").rstrip("/") or None,
            stripe=StripeSettings.from_env(env),
            bonus_multiplier=_float(env, "UPSHIFT_BONUS_MULTIPLIER", 1.0),
            audit_signing_key=_signing_key(env.get("UPSHIFT_AUDIT_SIGNING_KEY")),
        )


def _signing_key(raw: str | None) -> AuditSigningKey | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        return AuditSigningKey.from_base64(raw)
    except SigningKeyError as exc:
        raise SettingsError(str(exc)) from None


@lru_cache(maxsize=64)
def _networks(items: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(p, strict=False) for p in items)
    except ValueError as exc:
        raise SettingsError(f"UPSHIFT_TRUSTED_PROXIES: {exc}") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
