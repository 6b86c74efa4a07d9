"""Orgs, members, invites, API keys and the caller's profile (the ``orgs`` function).

Each handler authenticates, calls one RPC, and returns what it returned: every permission
check happens inside the RPC.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..auth import session
from ..db import call
from ..errors import ApiError
from ..http import Ctx, Router
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
)

router = Router("orgs")
ORG_ERRORS = (400, 401, 403, 404)


def uuid_param(ctx: Ctx, name: str) -> str:
    raw = ctx.params[name]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise ApiError(400, "invalid_request", f"{name}: not a UUID.", field=name) from None


def rpc(ctx: Ctx, function: str, **args: Any) -> Any:
    with session(ctx) as (_actor, cur):
        return call(cur, function, **args)


@router.route("POST", "/api/orgs", body=CreateOrg, response=Org, status=201,
              summary="Create an org; you become its admin", errors=(400, 401, 403, 409))
def create_org(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(CreateOrg)
    return rpc(ctx, "create_org", name=body.name, slug=body.slug), 201


@router.route("GET", "/api/orgs", response=OrgList, summary="Your orgs, with your role", errors=(401,))
def list_orgs(ctx: Ctx):  # type: ignore[no-untyped-def]
    return {"data": rpc(ctx, "list_my_orgs")}


@router.route("GET", "/api/orgs/{org}", response=Org, summary="One of your orgs", errors=ORG_ERRORS)
def get_org(ctx: Ctx):  # type: ignore[no-untyped-def]
    return rpc(ctx, "get_org", org=ctx.params["org"])


@router.route("PATCH", "/api/orgs/{org}", body=UpdateOrg, response=Org,
              summary="Rename an org or change its slug (admin)", errors=(*ORG_ERRORS, 409))
def update_org(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(UpdateOrg)
    return rpc(ctx, "update_org", org=ctx.params["org"], name=body.name, slug=body.slug)


@router.route("GET", "/api/orgs/{org}/members", summary="Members of an org", errors=ORG_ERRORS)
def list_members(ctx: Ctx):  # type: ignore[no-untyped-def]
    return {"data": rpc(ctx, "list_members", org=ctx.params["org"])}


@router.route("PATCH", "/api/orgs/{org}/members/{user_id}", body=SetRole,
              summary="Change a member's role (admin)", errors=(*ORG_ERRORS, 409))
def set_member_role(ctx: Ctx):  # type: ignore[no-untyped-def]
    user_id = uuid_param(ctx, "user_id")
    body = ctx.body(SetRole)
    return rpc(ctx, "set_member_role", org=ctx.params["org"], user_id=user_id, role=body.role)


@router.route("DELETE", "/api/orgs/{org}/members/{user_id}",
              summary="Remove a member (admin) or leave (yourself)", errors=(*ORG_ERRORS, 409))
def remove_member(ctx: Ctx):  # type: ignore[no-untyped-def]
    user_id = uuid_param(ctx, "user_id")
    return rpc(ctx, "remove_member", org=ctx.params["org"], user_id=user_id)


@router.route("POST", "/api/orgs/{org}/invites", body=CreateInvite, status=201,
              summary="Invite an email (admin); the token is shown once", errors=ORG_ERRORS)
def create_invite(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(CreateInvite)
    return rpc(ctx, "create_invite", org=ctx.params["org"], email=body.email, role=body.role), 201


@router.route("GET", "/api/orgs/{org}/invites", summary="Pending invites (admin)", errors=ORG_ERRORS)
def list_invites(ctx: Ctx):  # type: ignore[no-untyped-def]
    return {"data": rpc(ctx, "list_invites", org=ctx.params["org"])}


@router.route("DELETE", "/api/orgs/{org}/invites/{invite_id}", summary="Revoke an invite (admin)",
              errors=ORG_ERRORS)
def revoke_invite(ctx: Ctx):  # type: ignore[no-untyped-def]
    invite_id = uuid_param(ctx, "invite_id")
    return rpc(ctx, "revoke_invite", org=ctx.params["org"], invite_id=invite_id)


@router.route("POST", "/api/invites/accept", body=AcceptInvite, response=Org,
              summary="Join an org with an invite sent to your email", errors=(400, 401, 403, 404, 409))
def accept_invite(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(AcceptInvite)
    return rpc(ctx, "accept_invite", token=body.token)


@router.route("POST", "/api/api-keys", body=CreateApiKey, status=201,
              summary="Create an API key; the secret is shown once", errors=ORG_ERRORS)
def create_api_key(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(CreateApiKey)
    return rpc(ctx, "create_api_key", name=body.name, kind=body.kind, org=body.org_id,
               expires_at=body.expires_at), 201


@router.route("GET", "/api/api-keys", summary="Your keys and your orgs' service keys (admin)", errors=(401,))
def list_api_keys(ctx: Ctx):  # type: ignore[no-untyped-def]
    return {"data": rpc(ctx, "list_api_keys")}


@router.route("DELETE", "/api/api-keys/{key_id}", summary="Revoke an API key", errors=(400, 401, 404))
def revoke_api_key(ctx: Ctx):  # type: ignore[no-untyped-def]
    key_id = uuid_param(ctx, "key_id")
    return rpc(ctx, "revoke_api_key", key_id=key_id)


@router.route("GET", "/api/me", summary="Your profile, balance, plan, memberships, default org", errors=(401,))
def me(ctx: Ctx):  # type: ignore[no-untyped-def]
    with session(ctx) as (actor, cur):
        if actor.user_id is None:
            context = call(cur, "resolve_org", org=None)
            return {"service_key": {"id": actor.key_id, "org": context}}
        return call(cur, "me")


@router.route("PUT", "/api/me/default-org", body=SetDefaultOrg, summary="Select your default org",
              errors=ORG_ERRORS)
def set_default_org(ctx: Ctx):  # type: ignore[no-untyped-def]
    body = ctx.body(SetDefaultOrg)
    return rpc(ctx, "set_default_org", org=body.org_id)
