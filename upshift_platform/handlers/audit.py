"""The audit function: ingest from the upshift CLI, query, streamed export, chain verification,
signed checkpoints of a log's head (so that removing its newest rows is detectable)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from .. import csvsafe
from .. import cursor as keyset
from ..context import explicit_org
from ..encoding import dumps
from ..errors import ApiError
from ..models import (
    AuditBatchIn,
    AuditCheckpoint,
    AuditCheckpointQuery,
    AuditExportQuery,
    AuditIngest,
    AuditPublicKey,
    AuditQuery,
    AuditVerifyQuery,
)
from ..routing import Ctx, Router, RowStream
from ..session import Row, Session
from ..signing import AuditSigningKey

router = Router("audit")
log = logging.getLogger("upshift.audit")
COLUMNS = ("id", "seq", "org_id", "scope_id", "actor_kind", "user_id", "service_key_id", "event_type",
           "resource_type", "resource_id", "metadata", "ip", "user_agent", "client_timestamp", "created_at")


def log_rejection(ctx: Ctx, err: ApiError) -> None:
    """The CLI ignores the answer to its post, so every refused one is logged with the reason."""
    data = ctx.json_if_parsed()
    count = None
    if isinstance(data, dict):
        events = data.get("events")
        count = (len(events) if isinstance(events, list) else None) if "events" in data else 1
    log.warning(json.dumps({"event": "audit_event_rejected", "request_id": ctx.request_id, "status": err.status,
                            "error": err.code, "reason": err.message, "field": err.fields.get("field"),
                            "events": count, "actor_id": ctx.actor_id}))


@router.route("POST", "/audit-events", status=201, on_reject=log_rejection,
              summary="Record audit events (the upshift CLI's single event, or {\"events\": [...]} up to 500)",
              errors=(400, 401, 403, 409, 413))
def ingest(ctx: Ctx, body: AuditIngest, db: Session) -> dict[str, Any]:
    # The events go to the database as they were sent; it checks every value (and the batch's size).
    raw = ctx.json()
    batch = isinstance(body.root, AuditBatchIn)
    result = db.call_dict("record_audit_events", events=raw["events"] if batch else [raw],
                          org=explicit_org(ctx, body.root.org_id if batch else None),
                          idempotency_key=ctx.header("Idempotency-Key"))
    if result["events"]:
        ctx.note_org(result["events"][0].get("org_id"))
    return result


# Each optional filter of a query: the field, and the condition it adds (its value is the parameter of that name).
FILTERS = (
    ("since", "l.created_at >= %(since)s"),
    ("until", "l.created_at < %(until)s"),
    ("event_type", "l.event_type = any(%(event_type)s)"),
    ("actor", "(l.user_id = %(actor)s or l.service_key_id = %(actor)s)"),
    ("resource_type", "l.resource_type = %(resource_type)s"),
    ("resource_id", "l.resource_id = %(resource_id)s"),
)


def _filters(q: AuditQuery | AuditExportQuery, scope: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    where = ["l.scope_id = %(scope)s"]
    if scope["kind"] == "user":
        where.append("l.org_id is null")
    params: dict[str, Any] = {"scope": scope["scope_id"]}
    for name, condition in FILTERS:
        value = getattr(q, name)
        if value:
            where.append(condition)
            params[name] = value
    return where, params


SELECT = ("select l.id, l.seq, l.org_id, l.scope_id, l.actor_kind, l.user_id, l.service_key_id, l.event_type,"
          " l.resource_type, l.resource_id, l.metadata, host(l.ip) as ip, l.user_agent, l.client_timestamp,"
          " l.created_at from public.audit_logs l")


@router.route("GET", "/api/audit-logs",
              summary="Audit events, newest first (org: admin/viewer on the Team plan; else your own)",
              errors=(400, 401, 403))
def query(ctx: Ctx, query: AuditQuery, db: Session) -> dict[str, Any]:
    after = keyset.decode(query.cursor)
    scope = db.call_dict("audit_scope", org=query.org_id)
    ctx.note_org(scope.get("org_id"))
    where, params = _filters(query, scope)
    if after:
        where.append("(l.created_at, l.id) < (%(after_ts)s, %(after_id)s)")
        params.update(after_ts=after[0], after_id=after[1])
    params["limit"] = query.limit + 1
    rows = db.query(f"{SELECT} where {' and '.join(where)} order by l.created_at desc, l.id desc limit %(limit)s",
                    params)
    return keyset.page(rows, query.limit)


def _csv(rows: Iterator[Row]) -> Iterator[str]:
    yield csvsafe.line(COLUMNS)
    for row in rows:
        yield csvsafe.line(row[c] for c in COLUMNS)


def _ndjson(rows: Iterator[Row]) -> Iterator[str]:
    for row in rows:
        yield dumps(row) + "\n"


@router.route("GET", "/api/audit-logs/export", media_types=("text/csv", "application/x-ndjson"),
              summary="Stream every matching event as CSV or NDJSON (recorded as an audit_export event)",
              errors=(400, 401, 403))
def export(ctx: Ctx, query: AuditExportQuery, db: Session) -> RowStream:
    filters = query.model_dump(mode="json", exclude_none=True, exclude={"format", "org_id"})
    scope = db.call_dict("record_audit_export", org=query.org_id, format=query.format, filters=filters)
    ctx.note_org(scope.get("org_id"))
    where, params = _filters(query, scope)
    return RowStream(
        sql=f"{SELECT} where {' and '.join(where)} order by l.created_at, l.id", params=params,
        render=_csv if query.format == "csv" else _ndjson,
        mimetype="text/csv" if query.format == "csv" else "application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="audit-log.{query.format}"',
                 "X-Audit-Export-Event": str(scope["export_event_id"])},
    )


@router.route("GET", "/api/audit-logs/verify",
              summary="Recompute the hash chain: ok, or the first broken or missing sequence number; with "
                      "checkpoint_seq and checkpoint_hash, also whether the log still holds that checkpoint's row",
              errors=(400, 401, 403))
def verify(query: AuditVerifyQuery, db: Session) -> object:
    if query.checkpoint_seq is None and query.checkpoint_hash is None:
        return db.call("verify_audit_log", org=query.org_id)
    # One given without the other, or either malformed, is the database's 400.
    return db.call("verify_audit_checkpoint", checkpoint_seq=query.checkpoint_seq,
                   checkpoint_hash=query.checkpoint_hash, org=query.org_id)


def _signing_key(ctx: Ctx) -> AuditSigningKey:
    key = ctx.platform.settings.audit_signing_key
    if key is None:
        raise ApiError(503, "signing_not_configured",
                       "Audit checkpoints are not available: this deployment has no signing key "
                       "(UPSHIFT_AUDIT_SIGNING_KEY is not set).")
    return key


@router.route("GET", "/api/audit-logs/checkpoint", response=AuditCheckpoint,
              summary="A signed checkpoint of the log's head (org: admin/viewer on the Team plan; else your own)",
              errors=(400, 401, 403))
def checkpoint(ctx: Ctx, query: AuditCheckpointQuery, db: Session) -> dict[str, Any]:
    key = _signing_key(ctx)
    head = db.call_dict("audit_head", org=query.org_id)
    ctx.note_org(head.get("org_id"))
    return key.sign_checkpoint(head)


@router.route("GET", "/api/audit-logs/public-key", response=AuditPublicKey,
              summary="The Ed25519 public key that checks audit checkpoints (no authentication)")
def public_key(ctx: Ctx) -> dict[str, str]:
    return _signing_key(ctx).public_key_json()
