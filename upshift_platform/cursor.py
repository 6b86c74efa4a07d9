"""Opaque keyset cursors on (created_at, id): never OFFSET, never a total count."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

from .errors import ApiError


def encode(created_at: datetime | str, row_id: Any) -> str:
    """A cursor after this row (``created_at`` as a datetime, or as the RFC 3339 text an RPC answered)."""
    when = created_at if isinstance(created_at, datetime) else datetime.fromisoformat(created_at)
    stamp = when.isoformat()
    raw = json.dumps([stamp, str(row_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = json.loads(raw)
        return datetime.fromisoformat(created_at), str(uuid.UUID(row_id))
    except (ValueError, TypeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned.", field="cursor") from None


def page(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """``{"data": ..., "next_cursor": ...}`` from ``limit + 1`` rows fetched newest first."""
    data = rows[:limit]
    more = len(rows) > limit
    return {"data": data, "next_cursor": encode(data[-1]["created_at"], data[-1]["id"]) if more else None}
