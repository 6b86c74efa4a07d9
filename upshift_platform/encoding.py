"""The one JSON encoding of every answer: JSON responses, NDJSON export lines, JSON in CSV cells.

Times are RFC 3339 with a ``T``, written the way PostgreSQL writes a ``timestamptz`` inside
``jsonb`` (``2026-11-25T12:00:12.44+00:00``: the session's offset, no trailing zeros in the
fraction), so a time reads the same whether it came through an RPC's jsonb answer or as a
Python ``datetime`` from a plain query. UUIDs are strings, decimals are numbers. A type this
module does not know is a ``TypeError`` (a bug to fix here), never ``str(value)``.
"""

from __future__ import annotations

import json
from datetime import date, datetime, time
from decimal import Decimal
from uuid import UUID


def timestamp(moment: datetime) -> str:
    """``2026-11-25T12:00:12.446617+00:00``; ``.44`` rather than ``.440000``; no fraction when it is zero."""
    text = moment.isoformat()
    if moment.microsecond:
        whole, _, rest = text.partition(".")
        text = f"{whole}.{rest[:6].rstrip('0')}{rest[6:]}"
    return text


def _encode(value: object) -> object:
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return int(value) if value.is_finite() and value == value.to_integral_value() else float(value)
    raise TypeError(f"{type(value).__name__} has no JSON encoding (see upshift_platform/encoding.py)")


def dumps(value: object) -> str:
    """Compact JSON (no spaces), ASCII only, never ``NaN``."""
    return json.dumps(value, default=_encode, separators=(",", ":"), allow_nan=False)
