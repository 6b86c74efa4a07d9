"""Request and response models: they check the JSON's shape and describe the API (OpenAPI).

A rule has one home. Request models check only what JSON cannot get wrong for the database:
objects vs arrays, strings vs numbers, required fields, UUIDs and date-times that parse,
integers that fit a bigint, unknown fields where they are refused. Value rules (ranges,
lengths, patterns, allowed values) are the database's: the RPC that takes the value checks it
and answers with its own error code, for HTTP and ``supabase.rpc`` callers alike, and these
models only *describe* them for OpenAPI (``described``). Rules the database has no part in stay
here: query parameters that build our SQL, org references, what selects a price in our
settings (pack, tier), the export format.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, RootModel

ORG_REF_MAX_LENGTH = 64
OrgRef = Field(default=None, min_length=1, max_length=ORG_REF_MAX_LENGTH, description="An org's id or slug")
# A bigint parameter: the range is the type's, so a larger number is a malformed one (400 invalid_request).
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
StrictInt64 = Annotated[Int64, Field(strict=True)]  # in a JSON body: 1, not "1", 1.0 or true


def described(default: Any = ..., *, description: str | None = None, **schema: Any) -> Any:
    """A field whose value rule is enforced elsewhere: described in the JSON schema, not checked here.

    Elsewhere is the database (the RPC that takes the value), except for the org reference of
    ``GET /billing/status``, which ``context.explicit_org`` checks like the header's.

    ``schema`` holds JSON-schema keywords (``minLength``, ``maximum``, ``pattern``, ``enum``,
    ``maxItems``, ...); on an optional field they describe its non-null form.
    """

    def describe(field_schema: dict[str, Any]) -> None:
        branches = [b for b in field_schema.get("anyOf", []) if b.get("type") != "null"]
        (branches[0] if len(branches) == 1 else field_schema).update(schema)

    return Field(default, description=description, json_schema_extra=describe)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Lenient(BaseModel):
    """Bodies the upshift CLI sends: unknown fields (like its repeated ``token``) are ignored."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class Error(BaseModel):
    error: str = Field(description="Stable machine-readable code")
    message: str = Field(description="A human sentence")


# --- orgs ------------------------------------------------------------------------------------


NAME: dict[str, Any] = {"minLength": 1, "maxLength": 100}
SLUG: dict[str, Any] = {"minLength": 1, "maxLength": 40,
                        "pattern": r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38}[A-Za-z0-9])?$"}
ROLES: dict[str, Any] = {"enum": ["admin", "member", "viewer"]}


class CreateOrg(Strict):
    name: str = described(**NAME)
    slug: str = described(**SLUG)


class UpdateOrg(Strict):
    name: str | None = described(None, **NAME)
    slug: str | None = described(None, **SLUG)


class SetRole(Strict):
    role: str = described(**ROLES)


class CreateInvite(Strict):
    email: str = described(minLength=3, maxLength=320, pattern=r"^[^@\s]+@[^@\s]+$")
    role: str = described("member", **ROLES)


class AcceptInvite(Strict):
    token: str = Field(min_length=10, max_length=200)


class CreateApiKey(Strict):
    name: str = described(**NAME)
    kind: str = described("personal", enum=["personal", "service"])
    org_id: str | None = OrgRef
    expires_at: datetime | None = None


class SetDefaultOrg(Strict):
    org_id: str | None = Field(default=None, max_length=ORG_REF_MAX_LENGTH,
                               description="An org id or slug; null clears it")


class Org(BaseModel):
    id: UUID
    slug: str
    name: str
    plan: str
    credit_balance: int
    role: str
    created_at: datetime
    updated_at: datetime


class OrgList(BaseModel):
    data: list[Org]


# --- credits ---------------------------------------------------------------------------------


class Consume(Lenient):
    """The upshift CLI's body: ``{"action": "explain", "count": 1}``."""

    action: str = described(description="explain, fix, audit, ...", minLength=1, maxLength=40)
    count: StrictInt64 = described(description="Credits to spend; at least the action's price",
                                  minimum=1, maximum=1_000_000)
    org_id: str | None = OrgRef
    idempotency_key: str | None = described(None, minLength=1, maxLength=200)


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
    plan: str


class BillingStatus(BaseModel):
    tier: Literal["free", "pro", "team"]
    balance: int
    available: int = Field(description="balance less the credits active holds reserve")
    held: int = Field(description="Credits reserved by active holds")
    bonusMultiplier: float
    source: Literal["org", "user"]
    org: StatusOrg | None
    personal_balance: int | None


class StatusQuery(Lenient):
    org_id: str | None = described(None, description="An org's id or slug (or send X-Upshift-Org)",
                                   minLength=1, maxLength=ORG_REF_MAX_LENGTH)


class TransactionsQuery(Strict):
    org_id: str | None = OrgRef
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=200)


class UsageQuery(Strict):
    """``GET /api/orgs/{org}/usage``: ``from`` and ``to`` bound the range (``[from, to)``), ``group_by`` names the
    groups. The range rules (from before to, at most 366 days) and the group names are the database's."""

    since: datetime | None = Field(default=None, alias="from",
                                   description="Start of the range, inclusive (default: 30 days before to)")
    until: datetime | None = Field(default=None, alias="to", description="End of the range, exclusive (default: now)")
    group_by: str = described("day,actor", description="Comma-separated: day (UTC), actor; empty: one total",
                              pattern=r"^(day|actor)?(,(day|actor))*$")


# --- audit -----------------------------------------------------------------------------------


class AuditEventIn(Lenient):
    """One event as the upshift CLI posts it. Type-specific metadata is checked by the database."""

    event_type: str = described(description="upgrade, fix, scan_upload, or any ^[a-z][a-z0-9_.]{0,63}$",
                               minLength=1, maxLength=64)
    resource_type: str = described(minLength=1, maxLength=64)
    resource_id: str | None = described(None, maxLength=512)
    metadata: dict[str, Any] = Field(default_factory=dict, description="A JSON object of at most 16 KB")
    org_id: str | None = OrgRef
    timestamp: str | None = described(None, description="The client's ISO 8601 time", maxLength=40)


class AuditBatchIn(Lenient):
    events: list[AuditEventIn] = described(minItems=1, maxItems=500)
    org_id: str | None = OrgRef


class AuditIngest(RootModel[AuditBatchIn | AuditEventIn]):
    """What ``POST /audit-events`` takes: ``{"events": [...]}`` (a batch) or one event (the CLI's form)."""

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        """A body with ``events`` is a batch, anything else one event: each form's errors name its own fields."""
        form = AuditBatchIn if isinstance(obj, dict) and "events" in obj else AuditEventIn
        return cls(form.model_validate(obj, **kwargs))


class AuditQuery(Strict):
    org_id: str | None = OrgRef
    since: datetime | None = None
    until: datetime | None = None
    event_type: list[str] | None = Field(default=None, max_length=20)
    actor: UUID | None = Field(default=None, description="A user id or a service key id")
    resource_type: str | None = Field(default=None, max_length=64)
    resource_id: str | None = Field(default=None, max_length=512)
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=200)


class AuditExportQuery(Strict):
    format: Literal["csv", "ndjson"] = "ndjson"
    org_id: str | None = OrgRef
    since: datetime | None = None
    until: datetime | None = None
    event_type: list[str] | None = Field(default=None, max_length=20)
    actor: UUID | None = None
    resource_type: str | None = Field(default=None, max_length=64)
    resource_id: str | None = Field(default=None, max_length=512)


class AuditVerifyQuery(Strict):
    org_id: str | None = OrgRef
    checkpoint_seq: Int64 | None = described(
        None, description="A checkpoint's seq (with checkpoint_hash): is its row still there?", minimum=0)
    checkpoint_hash: str | None = described(
        None, description="The checkpoint's hash, 64 hex digits (with checkpoint_seq)", pattern=r"^[0-9a-fA-F]{64}$")


class AuditCheckpointQuery(Strict):
    org_id: str | None = OrgRef


class AuditCheckpoint(BaseModel):
    """A signed statement of an audit log's head; the signature covers the other fields but
    ``algorithm`` and ``signature`` (see docs/api.md, Checkpoints)."""

    format: Literal["upshift.audit-checkpoint.v1"]
    scope_id: UUID
    org_id: UUID | None
    seq: int = Field(ge=0)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="The head row's hash (hex); zeros for an empty log")
    signed_at: str = Field(description="RFC 3339, UTC: 2026-11-25T08:13:58Z")
    key_id: str = Field(description="The first 16 hex digits of sha256(raw public key)")
    algorithm: Literal["Ed25519"]
    signature: str = Field(description="base64url (with padding) of the Ed25519 signature of the canonical payload")


class AuditPublicKey(BaseModel):
    key_id: str
    algorithm: Literal["Ed25519"]
    public_key: str = Field(description="base64 of the raw 32-byte public key")
    public_key_pem: str = Field(description="The same key as a PEM SubjectPublicKeyInfo")


# --- checkout --------------------------------------------------------------------------------


class CheckoutCredits(Lenient):
    """``{"pack": "small", "token": "..."}`` as the CLI sends it (the repeated token is ignored)."""

    pack: Literal["small", "medium", "large"]
    org_id: str | None = OrgRef


class CheckoutSubscription(Lenient):
    tier: Literal["pro", "team"]
    org_id: str | None = OrgRef


class CheckoutResult(BaseModel):
    url: str
    id: str
    account_kind: Literal["org", "user"]
    account_id: UUID
    credits: int | None = None


# --- spend controls: holds, lots, limits, jobs -------------------------------------------------


class HoldIn(Strict):
    """``POST /credits/holds``: reserve up to ``amount`` credits for ``reason`` (a priced action)."""

    amount: StrictInt64 = described(description="Credits to reserve", minimum=1, maximum=1_000_000)
    reason: str = described(description="The action (explain, fix, audit, ...)", minLength=1, maxLength=40)
    ttl_seconds: StrictInt64 = described(900, description="Seconds until the hold expires by itself",
                                         minimum=1, maximum=86400)
    org_id: str | None = OrgRef
    idempotency_key: str | None = described(None, minLength=1, maxLength=200)
    metadata: dict[str, Any] = Field(default_factory=dict, description="A JSON object of at most 4 KB")


class CaptureIn(Strict):
    amount: StrictInt64 | None = described(None, description="Credits to charge, at most the held amount "
                                           "(default: all of it); the rest is released", minimum=1)


class ReleaseIn(Strict):
    pass


class Hold(BaseModel):
    id: UUID
    status: Literal["active", "captured", "released", "expired"]
    amount: int
    captured: int | None
    reason: str
    expires_at: datetime
    source: Literal["org", "user"]
    org_id: UUID | None
    user_id: UUID | None
    service_key_id: UUID | None
    idempotency_key: str | None
    metadata: dict[str, Any]
    created_at: datetime
    settled_at: datetime | None
    transaction_id: UUID | None
    balance: int
    available: int
    replayed: bool


class HoldsQuery(Strict):
    org_id: str | None = OrgRef
    status: str | None = described("active", description="active (default), captured, released, expired; "
                                   "empty for all", enum=["active", "captured", "released", "expired", ""])


class LotsQuery(Strict):
    org_id: str | None = OrgRef
    include_spent: bool = Field(default=False, description="Also list lots with nothing left")


class SpendLimitIn(Strict):
    credits: StrictInt64 = described(description="Credits per period (0 stops all spending)", minimum=0,
                                     maximum=1_000_000_000)
    period: str = described(description="day and month run in UTC; total never resets",
                            enum=["day", "month", "total"])


class SpendLimitReached(Error):
    limit: int
    used: int
    needed: int
    period: str
    resets_at: datetime | None
    subject: str


class JobsRun(Strict):
    max_accounts: StrictInt64 = described(1000, description="At most this many accounts swept per call",
                                          minimum=1, maximum=100000)
