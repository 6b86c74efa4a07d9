"""functions-framework HTTP targets, one per deployable function.

Deploy each with ``--entry-point billing`` (or ``stripe_webhook``, ``audit``, ``orgs``);
locally ``upshift-platform serve`` serves them all on one port.
"""

from __future__ import annotations

import flask
import functions_framework

from upshift_platform.app import platform


@functions_framework.http
def billing(request: flask.Request) -> flask.Response:
    """POST /credits/consume, GET /billing/status, checkout, GET /api/credits/transactions."""
    return platform().handle("billing", request)


@functions_framework.http
def stripe_webhook(request: flask.Request) -> flask.Response:
    """POST /stripe/webhook."""
    return platform().handle("stripe_webhook", request)


@functions_framework.http
def audit(request: flask.Request) -> flask.Response:
    """POST /audit-events, GET /api/audit-logs[/export|/verify|/checkpoint|/public-key]."""
    return platform().handle("audit", request)


@functions_framework.http
def orgs(request: flask.Request) -> flask.Response:
    """/api/orgs..., /api/invites/accept, /api/api-keys, /api/me."""
    return platform().handle("orgs", request)
