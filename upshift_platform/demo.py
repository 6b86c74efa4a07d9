"""``upshift-platform demo``: org ``acme`` (Team plan, 500 credits), three users and their keys.

Idempotent: a second run creates nothing it already created. Key secrets are stored only as
hashes in the database, so the demo keeps the ones it minted in ``.data/demo-keys.json``
(git-ignored, mode 0600, local development only) and mints new keys only when those no longer
work.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import psycopg

from .auth import hash_api_key
from .clikit import database_url, service_tx
from .db import call
from .paths import project_root

ORG_SLUG = "acme"
USERS = {"admin": ("admin@acme.test", "admin"), "member": ("member@acme.test", "member"),
         "viewer": ("viewer@acme.test", "viewer")}


def keys_file() -> Path:
    return project_root() / ".data" / "demo-keys.json"


def _working(cur: psycopg.Cursor[Any], secret: str | None) -> bool:
    if not secret:
        return False
    row = call(cur, "authenticate_api_key", p_key_hash=hash_api_key(secret))
    return bool(row) and row.get("status") == "active"


def demo_data(url: str, endpoint: str) -> dict[str, Any]:
    path = keys_file()
    try:
        saved: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    with service_tx(url) as cur:
        users = {role: str(call(cur, "admin_find_user", email=email, create_missing=True))
                 for role, (email, _r) in USERS.items()}
        row = cur.execute("select id from public.orgs where slug = %s", (ORG_SLUG,)).fetchone()
        if row is None:
            org = call(cur, "admin_create_org", name="Acme", slug=ORG_SLUG, plan="team", admin_user_id=users["admin"])
            org_id = str(org["id"])
        else:
            org_id = str(row["id"])
        call(cur, "grant_credits", amount=500, reason="admin_grant", org=org_id, user_id=None,
             idempotency_key="demo:acme:initial-credits", metadata={"via": "demo"})
        for role, (_email, org_role) in USERS.items():
            member = cur.execute("select 1 from public.org_members where org_id = %s and user_id = %s",
                                 (org_id, users[role])).fetchone()
            if member is None:
                call(cur, "admin_add_member", org=org_id, user_id=users[role], role=org_role)
        keys: dict[str, str] = {}
        for role in ("admin", "member", "viewer", "ci"):
            if _working(cur, saved.get(role)):
                keys[role] = saved[role]
                continue
            kind, owner = ("service", users["admin"]) if role == "ci" else ("personal", users[role])
            key = call(cur, "admin_create_api_key", user_id=owner, name=f"demo {role}", kind=kind, org=org_id,
                       expires_at=None)
            keys[role] = key["secret"]
    if keys != saved:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(keys, f, indent=2)
    return {
        "endpoint": endpoint,
        "audit_url": f"{endpoint}/audit-events",
        "org_id": org_id,
        "org_slug": ORG_SLUG,
        "users": {role: {"email": email, "id": users[role], "role": r} for role, (email, r) in USERS.items()},
        "keys": keys,
    }


def paste_block(data: dict[str, Any]) -> str:
    keys = data["keys"]
    return "\n".join([
        "",
        "Point the upshift CLI at this platform (paste into your shell):",
        "",
        f"  export UPSHIFT_CREDITS_ENDPOINT={data['endpoint']}",
        f"  export UPSHIFT_API_TOKEN={keys['member']}",
        f"  export UPSHIFT_AUDIT_URL={data['audit_url']}",
        f"  export UPSHIFT_ORG={data['org_slug']}",
        "",
        f"That token is member@acme.test's key (org {data['org_slug']}, Team plan). Other demo keys:",
        f"  admin  {keys['admin']}",
        f"  viewer {keys['viewer']}",
        f"  CI     {keys['ci']}   (org service key)",
        "",
    ])


def cmd_demo(args: argparse.Namespace) -> None:

    endpoint = (args.endpoint or os.environ.get("UPSHIFT_PUBLIC_BASE_URL") or "http://127.0.0.1:8080").rstrip("/")
    data = demo_data(database_url(args), endpoint)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(paste_block(data))


def add_commands(sub: Any, add: Any, db_target: Any) -> None:
    p = add(sub, "demo", cmd_demo, "create (idempotently) the demo org acme, its users and keys")
    db_target(p)
    p.add_argument("--endpoint", help="the platform's base URL (default: UPSHIFT_PUBLIC_BASE_URL or :8080)")
