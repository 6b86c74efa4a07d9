"""Request and response models: they validate input and describe the API (OpenAPI)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

OrgRef = Field(default=None, min_length=1, max_length=64, description="An org's id or slug")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Lenient(BaseModel):
    """Bodies the upshift CLI sends: unknown fields (like its repeated ``token``) are ignored."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class Error(BaseModel):
    error: str = Field(description="Stable machine-readable code")
    message: str = Field(description="A human sentence")


# --- orgs ------------------------------------------------------------------------------------


class CreateOrg(Strict):
    name: str = Field(min_length=1, max_length=100)
    slug: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38}[A-Za-z0-9])?$")


class UpdateOrg(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    slug: str | None = Field(default=None, min_length=1, max_length=40,
                             pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38}[A-Za-z0-9])?$")


Role = Literal["admin", "member", "viewer"]


class SetRole(Strict):
    role: Role


class CreateInvite(Strict):
    email: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    role: Role = "member"


class AcceptInvite(Strict):
    token: str = Field(min_length=10, max_length=200)


class CreateApiKey(Strict):
    name: str = Field(min_length=1, max_length=100)
    kind: Literal["personal", "service"] = "personal"
    org_id: str | None = OrgRef
    expires_at: datetime | None = None


class SetDefaultOrg(Strict):
    org_id: str | None = Field(default=None, max_length=64, description="An org id or slug; null clears it")


class Org(BaseModel):
    id: UUID
    slug: str
    name: str
    plan: str
    credit_balance: int
    role: str


class OrgList(BaseModel):
    data: list[Org]


# --- credits ---------------------------------------------------------------------------------


class Consume(Lenient):
    """The upshift CLI's body: ``{"action": "explain", "count": 1}``."""

    action: str = Field(min_length=1, max_length=40, description="explain, fix, audit, ...")
    count: int = Field(ge=1, le=10000, strict=True, description="Credits to spend; at least the action's price")
    org_id: str | None = OrgRef
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class ConsumeResult(BaseModel):
    balance: int
    source: Literal["org", "user"]
    org_id: UUID | None
    org_slug: str | None
    transaction_id: UUID
    replayed: bool


class InsufficientCredits(Error):
    balance: int
    needed: int


class StatusOrg(BaseModel):
    id: UUID
    slug: str
    name: str
    role: str


class BillingStatus(BaseModel):
    tier: Literal["free", "pro", "team"]
    balance: int
    bonusMultiplier: float
    source: Literal["org", "user"]
    org: StatusOrg | None
    personal_balance: int | None


class TransactionsQuery(Strict):
    org_id: str | None = OrgRef
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=200)
