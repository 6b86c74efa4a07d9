"""The audit function: ingest from the upshift CLI, query, streamed export, chain verification,
signed checkpoints of a log's head (so that removing its newest rows is detectable)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import flask
import psycopg

from .. import csvsafe
from .. import cursor as keyset
from ..auth import request_headers, session
from ..context import explicit_org
from ..db import call
from ..encoding import dumps
from ..errors import ApiError, from_database
from ..http import Ctx, Router
from ..models import (
    AuditBatchIn,
    AuditCheckpoint,
    AuditCheckpointQuery,
    AuditEventIn,
    AuditExportQuery,
    AuditPublicKey,
    AuditQuery,
    AuditVerifyQuery,
)
from ..signing import AuditSigningKey

router = Router("audit")
log = logging.getLogger("upshift.audit")
METADATA_LIMIT = 16 * 1024
COLUMNS = ("id", "seq", "org_id", "scope_id", "actor_kind", "user_id", "service_key_id", "event_type",
           "resource_type", "resource_id", "metadata", "ip", "user_agent", "client_timestamp", "created_at")
MULTI = ("event_type",)


def _reject(ctx: Ctx, err: ApiError, count: int | None) -> ApiError:
    log.warning(json.dumps({"event": "audit_event_rejected", "request_id": ctx.request_id, "status": err.status,
                            "error": err.code, "reason": err.message, "field": err.fields.get("field"),
                            "events": count, "actor_id": ctx.actor_id}))
    return err


@router.route("POST", "/audit-events", body=AuditBatchIn, status=201,
              summary="Record audit events (the upshift CLI's single event, or {\"events\": [...]} up to 500)",
              errors=(400, 401, 403, 409, 413))
def ingest(ctx: Ctx):  # type: ignore[no-untyped-def]
    count: int | None = None
    try:
        data = ctx.json()
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "The body must be a JSON object (an event, or {\"events\": [...]}).")
        if "events" in data:
            events = data.get("events")
            count = len(events) if isinstance(events, list) else None
            if isinstance(events, list) and len(events) > 500:
                raise ApiError(400, "too_many_events", f"At most 500 events at once (got {len(events)}).",
                               field="events")
            batch = ctx.body(AuditBatchIn)
            raw_events = events
            body_org = batch.org_id
        else:
            count = 1
            ctx.body(AuditEventIn)
            raw_events = [data]
            body_org = None
        for i, event in enumerate(raw_events):
            size = len(json.dumps(event.get("metadata") or {}, separators=(",", ":")))
            if size > METADATA_LIMIT:
                raise ApiError(413, "metadata_too_large", f"events[{i}].metadata: {size} bytes, more than 16 KB.",
                               field=f"events[{i}].metadata", index=i)
        key = (ctx.request.headers.get("Idempotency-Key") or "").strip() or None
        with session(ctx) as (_actor, cur):
            org = explicit_org(ctx, body_org)
            result = call(cur, "record_audit_events", events=raw_events, org=org, idempotency_key=key)
    except ApiError as err:
        raise _reject(ctx, err, count) from None
    except psycopg.Error as exc:
        err = from_database(exc)
        if err.status < 500:
            raise _reject(ctx, err, count) from None
        raise
    if result["events"] and result["events"][0].get("org_id"):
        ctx.org_id = str(result["events"][0]["org_id"])
    return result, 201


def _filters(q: AuditQuery | AuditExportQuery, scope: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    where = ["l.scope_id = %(scope)s"]
    if scope["kind"] == "user":
        where.append("l.org_id is null")
    params: dict[str, Any] = {"scope": scope["scope_id"]}
    if q.since:
        where.append("l.created_at >= %(since)s")
        params["since"] = q.since
    if q.until:
        where.append("l.created_at < %(until)s")
        params["until"] = q.until
    if q.event_type:
        where.append("l.event_type = any(%(event_types)s)")
        params["event_types"] = q.event_type
    if q.actor:
        where.append("(l.user_id = %(actor)s or l.service_key_id = %(actor)s)")
        params["actor"] = q.actor
    if q.resource_type:
        where.append("l.resource_type = %(resource_type)s")
        params["resource_type"] = q.resource_type
    if q.resource_id:
        where.append("l.resource_id = %(resource_id)s")
        params["resource_id"] = q.resource_id
    return where, params


SELECT = ("select l.id, l.seq, l.org_id, l.scope_id, l.actor_kind, l.user_id, l.service_key_id, l.event_type,"
          " l.resource_type, l.resource_id, l.metadata, host(l.ip) as ip, l.user_agent, l.client_timestamp,"
          " l.created_at from public.audit_logs l")


@router.route("GET", "/api/audit-logs", query=AuditQuery,
              summary="Audit events, newest first (org: admin/viewer on the Team plan; else your own)",
              errors=(400, 401, 403))
def query(ctx: Ctx):  # type: ignore[no-untyped-def]
    q = ctx.query(AuditQuery, multi=MULTI)
    after = keyset.decode(q.cursor)
    with session(ctx) as (_actor, cur):
        scope = call(cur, "audit_scope", org=q.org_id)
        if scope.get("org_id"):
            ctx.org_id = str(scope["org_id"])
        where, params = _filters(q, scope)
        if after:
            where.append("(l.created_at, l.id) < (%(after_ts)s, %(after_id)s)")
            params.update(after_ts=after[0], after_id=after[1])
        params["limit"] = q.limit + 1
        rows = cur.execute(f"{SELECT} where {' and '.join(where)} order by l.created_at desc, l.id desc"
                           " limit %(limit)s", params).fetchall()
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return {"data": rows, "next_cursor": keyset.encode(rows[-1]["created_at"], rows[-1]["id"]) if more else None}


@router.route("GET", "/api/audit-logs/export", query=AuditExportQuery,
              summary="Stream every matching event as CSV or NDJSON (recorded as an audit_export event)",
              errors=(400, 401, 403))
def export(ctx: Ctx):  # type: ignore[no-untyped-def]
    q = ctx.query(AuditExportQuery, multi=MULTI)
    filters = q.model_dump(mode="json", exclude_none=True, exclude={"format", "org_id"})
    with session(ctx) as (actor, cur):
        scope = call(cur, "record_audit_export", org=q.org_id, format=q.format, filters=filters)
    if scope.get("org_id"):
        ctx.org_id = str(scope["org_id"])
    where, params = _filters(q, scope)
    sql = f"{SELECT} where {' and '.join(where)} order by l.created_at, l.id"
    rows = ctx.platform.db.stream("authenticated", actor.claims, request_headers(ctx), sql, params)

    def generate() -> Iterator[str]:
        if q.format == "csv":
            yield csvsafe.line(COLUMNS)
            for row in rows:
                yield csvsafe.line(row[c] for c in COLUMNS)
        else:
            for row in rows:
                yield dumps(row) + "\n"

    mimetype = "text/csv" if q.format == "csv" else "application/x-ndjson"
    response = flask.Response(generate(), mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="audit-log.{q.format}"'
    response.headers["X-Audit-Export-Event"] = str(scope["export_event_id"])
    return response


@router.route("GET", "/api/audit-logs/verify", query=AuditVerifyQuery,
              summary="Recompute the hash chain: ok, or the first broken or missing sequence number; with "
                      "checkpoint_seq and checkpoint_hash, also whether the log still holds that checkpoint's row",
              errors=(400, 401, 403))
def verify(ctx: Ctx):  # type: ignore[no-untyped-def]
    q = ctx.query(AuditVerifyQuery)
    with session(ctx) as (_actor, cur):
        if q.checkpoint_seq is None and q.checkpoint_hash is None:
            return call(cur, "verify_audit_log", org=q.org_id)
        # One given without the other is the database's 400 (checkpoint_incomplete).
        return call(cur, "verify_audit_checkpoint", checkpoint_seq=q.checkpoint_seq,
                    checkpoint_hash=q.checkpoint_hash, org=q.org_id)


def _signing_key(ctx: Ctx) -> AuditSigningKey:
    key: AuditSigningKey | None = ctx.platform.settings.audit_signing_key
    if key is None:
        raise ApiError(503, "signing_not_configured",
                       "Audit checkpoints are not available: this deployment has no signing key "
                       "(UPSHIFT_AUDIT_SIGNING_KEY is not set).")
    return key


@router.route("GET", "/api/audit-logs/checkpoint", query=AuditCheckpointQuery, response=AuditCheckpoint,
              summary="A signed checkpoint of the log's head (org: admin/viewer on the Team plan; else your own)",
              errors=(400, 401, 403))
def checkpoint(ctx: Ctx):  # type: ignore[no-untyped-def]
    key = _signing_key(ctx)
    q = ctx.query(AuditCheckpointQuery)
    with session(ctx) as (_actor, cur):
        head = call(cur, "audit_head", org=q.org_id)
    if head.get("org_id"):
        ctx.org_id = str(head["org_id"])
    return key.sign_checkpoint(head)


@router.route("GET", "/api/audit-logs/public-key", auth=False, response=AuditPublicKey,
              summary="The Ed25519 public key that checks audit checkpoints (no authentication)")
def public_key(ctx: Ctx):  # type: ignore[no-untyped-def]
    return _signing_key(ctx).public_key_json()
