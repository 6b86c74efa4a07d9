"""Orgs, members, invites, API keys and the caller's profile (the ``orgs`` function).

Each handler calls one RPC as the caller and answers what it returned: every permission check
and every value rule is inside the RPC.
"""

from __future__ import annotations

from uuid import UUID

from ..models import (
    AcceptInvite,
    CreateApiKey,
    CreateInvite,
    CreateOrg,
    Org,
    OrgList,
    SetDefaultOrg,
    SetRole,
    UpdateOrg,
    UsageQuery,
)
from ..routing import Router
from ..session import Session

router = Router("orgs")
ORG_ERRORS = (400, 401, 403, 404)


@router.route("POST", "/api/orgs", response=Org, status=201,
              summary="Create an org; you become its admin", errors=(400, 401, 403, 409))
def create_org(body: CreateOrg, db: Session) -> object:
    return db.call("create_org", name=body.name, slug=body.slug)


@router.route("GET", "/api/orgs", response=OrgList, summary="Your orgs, with your role", errors=(401,))
def list_orgs(db: Session) -> dict[str, object]:
    return {"data": db.call("list_my_orgs")}


@router.route("GET", "/api/orgs/{org}", response=Org, summary="One of your orgs", errors=ORG_ERRORS)
def get_org(org: str, db: Session) -> object:
    return db.call("get_org", org=org)


@router.route("PATCH", "/api/orgs/{org}", response=Org,
              summary="Rename an org or change its slug (admin)", errors=(*ORG_ERRORS, 409))
def update_org(org: str, body: UpdateOrg, db: Session) -> object:
    return db.call("update_org", org=org, name=body.name, slug=body.slug)


@router.route("GET", "/api/orgs/{org}/usage",
              summary="Credits spent per day and per actor (admins and viewers: everyone's; members: their own)",
              errors=ORG_ERRORS)
def org_usage(org: str, query: UsageQuery, db: Session) -> object:
    return db.call("org_usage", org=org, since=query.since, until=query.until, group_by=query.group_by)


@router.route("GET", "/api/orgs/{org}/members", summary="Members of an org", errors=ORG_ERRORS)
def list_members(org: str, db: Session) -> dict[str, object]:
    return {"data": db.call("list_members", org=org)}


@router.route("PATCH", "/api/orgs/{org}/members/{user_id}", summary="Change a member's role (admin)",
              errors=(*ORG_ERRORS, 409))
def set_member_role(org: str, user_id: UUID, body: SetRole, db: Session) -> object:
    return db.call("set_member_role", org=org, user_id=user_id, role=body.role)


@router.route("DELETE", "/api/orgs/{org}/members/{user_id}",
              summary="Remove a member (admin) or leave (yourself)", errors=(*ORG_ERRORS, 409))
def remove_member(org: str, user_id: UUID, db: Session) -> object:
    return db.call("remove_member", org=org, user_id=user_id)


@router.route("POST", "/api/orgs/{org}/invites", status=201,
              summary="Invite an email (admin); the token is shown once", errors=ORG_ERRORS)
def create_invite(org: str, body: CreateInvite, db: Session) -> object:
    return db.call("create_invite", org=org, email=body.email, role=body.role)


@router.route("GET", "/api/orgs/{org}/invites", summary="Pending invites (admin)", errors=ORG_ERRORS)
def list_invites(org: str, db: Session) -> dict[str, object]:
    return {"data": db.call("list_invites", org=org)}


@router.route("DELETE", "/api/orgs/{org}/invites/{invite_id}", summary="Revoke an invite (admin)",
              errors=ORG_ERRORS)
def revoke_invite(org: str, invite_id: UUID, db: Session) -> object:
    return db.call("revoke_invite", org=org, invite_id=invite_id)


@router.route("POST", "/api/invites/accept", response=Org,
              summary="Join an org with an invite sent to your email", errors=(400, 401, 403, 404, 409))
def accept_invite(body: AcceptInvite, db: Session) -> object:
    return db.call("accept_invite", token=body.token)


@router.route("POST", "/api/api-keys", status=201,
              summary="Create an API key; the secret is shown once", errors=ORG_ERRORS)
def create_api_key(body: CreateApiKey, db: Session) -> object:
    return db.call("create_api_key", name=body.name, kind=body.kind, org=body.org_id, expires_at=body.expires_at)


@router.route("GET", "/api/api-keys", summary="Your keys and your orgs' service keys (admin)", errors=(401,))
def list_api_keys(db: Session) -> dict[str, object]:
    return {"data": db.call("list_api_keys")}


@router.route("DELETE", "/api/api-keys/{key_id}", summary="Revoke an API key", errors=(400, 401, 404))
def revoke_api_key(key_id: UUID, db: Session) -> object:
    return db.call("revoke_api_key", key_id=key_id)


@router.route("GET", "/api/me", summary="Your profile, balance, plan, memberships, default org", errors=(401,))
def me(db: Session) -> object:
    limits = db.call("my_spend_limits")
    assert isinstance(limits, list)
    if db.actor.user_id is None:  # an org service key: which key, acting for which org, and its limit
        return {"service_key": {"id": db.actor.key_id, "org": db.call("resolve_org", org=None),
                                "spend_limit": limits[0] if limits else None}}
    me = db.call_dict("me")
    by_org = {str(limit["org_id"]): limit for limit in limits}
    for membership in me.get("memberships", []):  # each membership with the caller's own limit there (or null)
        membership["spend_limit"] = by_org.get(str(membership["org_id"]))
    return me


@router.route("PUT", "/api/me/default-org", summary="Select your default org", errors=ORG_ERRORS)
def set_default_org(body: SetDefaultOrg, db: Session) -> object:
    return db.call("set_default_org", org=body.org_id)
