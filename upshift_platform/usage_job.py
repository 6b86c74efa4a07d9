"""The usage rollup job: ``public.usage_rollup`` every few seconds, off the request path.

org_usage is exact whether or not this runs; it is fast (under 50 ms for a 1,000,000-row ledger) only for what
the job has folded, so something must call it: `upshift-platform run` and `serve` start this loop in the
background (``--usage-rollup-every``, default 5 s), `upshift-platform usage rollup --every 5` runs it alone,
and on Supabase pg_cron can call the RPC (docs/deploy.md). Several callers at once are harmless: a run that
finds another one going returns ``skipped``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

from .clikit import SERVICE
from .db import act_as, call, connect_kwargs

log = logging.getLogger("upshift.usage_job")


def run_once(url: str, *, wait_ms: int = 200) -> dict[str, Any]:
    """One run, in its own READ COMMITTED transaction as service_role: what it closed and folded."""
    with psycopg.connect(url, **connect_kwargs()) as conn, conn.transaction(), conn.cursor() as cur:
        act_as(cur, "service_role", SERVICE)
        result: dict[str, Any] = call(cur, "usage_rollup", wait_ms=wait_ms)
    return result


def start_background(url: str, every: float) -> threading.Event:
    """Run the job every ``every`` seconds in a daemon thread until the returned event is set. A failed run is
    logged and retried at the next tick (the database may be restarting)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                run_once(url)
            except psycopg.Error as exc:
                log.warning("usage rollup failed: %s", exc.diag.message_primary or exc)

    threading.Thread(target=loop, name="usage-rollup", daemon=True).start()
    return stop
