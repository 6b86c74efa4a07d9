"""CSV cells that a spreadsheet will not run as formulas (OWASP "CSV injection").

Audit exports carry text that clients chose (resource ids, user agents, metadata). A cell whose
text begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is prefixed with a
single quote, so Excel, LibreOffice and Google Sheets show it as text; the csv module then
quotes the cell where needed. Both exports (the HTTP API and ``upshift-platform audit export``)
write every cell through ``cell``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

from .encoding import dumps, timestamp

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> str:
    """One value as CSV text: JSON for objects and arrays and times as in JSON (``encoding``), '' for null; escaped."""
    if isinstance(value, dict | list):
        text = dumps(value)
    elif isinstance(value, datetime):
        text = timestamp(value)
    elif isinstance(value, date):
        text = value.isoformat()
    else:
        text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def line(values: Iterable[Any]) -> str:
    """One CSV record (``\\r\\n``-terminated), every value through ``cell``."""
    buf = io.StringIO()
    csv.writer(buf).writerow([cell(v) for v in values])
    return buf.getvalue()
