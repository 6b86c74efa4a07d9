"""The jobs function: the scheduled work Cloud Scheduler triggers (``upshift-platform jobs run`` locally).

Authenticated by a service credential, not a user: ``Authorization: Bearer <UPSHIFT_JOBS_TOKEN>`` (a Cloud
Scheduler HTTP job's header). The work itself is ``public.run_credit_jobs`` as ``service_role``: holds and
lots past their expiry are swept, and lots about to expire noticed.
"""

from __future__ import annotations

import hmac
from typing import Any

from ..errors import ApiError
from ..http import validate
from ..models import JobsRun
from ..routing import Ctx, Router
from ..session import Backend

router = Router("jobs")


def check_token(ctx: Ctx) -> None:
    expected = ctx.platform.settings.jobs_token
    if not expected:
        raise ApiError(503, "jobs_not_configured", "UPSHIFT_JOBS_TOKEN is not set on this server.")
    given = (ctx.request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "unauthenticated", "The jobs endpoint needs the scheduler's token (UPSHIFT_JOBS_TOKEN).")


@router.route("POST", "/jobs/run", summary="Run the scheduled credit jobs (expire holds and lots); for Cloud Scheduler",
              errors=(400, 401, 503))
def run_jobs(ctx: Ctx, backend: Backend) -> dict[str, Any]:
    check_token(ctx)  # before the body is read
    data = ctx.json()
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
    body = validate(JobsRun, data)
    with backend() as db:
        return db.call_dict("run_credit_jobs", max_accounts=body.max_accounts)
