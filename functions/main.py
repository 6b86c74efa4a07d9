"""functions-framework HTTP targets, one per deployable function.

Deploy each with ``--entry-point billing`` (or ``stripe_webhook``, ``audit``, ``orgs``, ``jobs``);
locally ``upshift-platform serve`` serves them all on one port.
"""

from __future__ import annotations

import flask
import functions_framework

from upshift_platform.app import platform


def _target(name: str, doc: str) -> functions_framework.HTTPFunction:
    """The HTTP target of the function ``name``: its Router, reached through the shared platform.

    Named ``name`` before it is registered: ``functions_framework.http`` records a target by its
    ``__name__`` (the ``--target`` / ``--entry-point`` that picks it), and the module attribute of
    that name is what functions-framework then loads.
    """

    def target(request: flask.Request) -> flask.Response:
        return platform().handle(name, request)

    target.__name__ = target.__qualname__ = name
    target.__doc__ = doc
    return functions_framework.http(target)


billing = _target("billing", "POST /credits/consume, GET /billing/status, checkout, GET /api/credits/transactions.")
stripe_webhook = _target("stripe_webhook", "POST /stripe/webhook.")
audit = _target("audit", "POST /audit-events, GET /api/audit-logs[/export|/verify|/checkpoint|/public-key].")
orgs = _target("orgs", "/api/orgs..., /api/invites/accept, /api/api-keys, /api/me.")
jobs = _target("jobs", "POST /jobs/run (Cloud Scheduler, with UPSHIFT_JOBS_TOKEN).")
