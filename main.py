"""Cloud Run functions entry point: deploy from the repository root with ``--entry-point billing``
(or ``stripe_webhook``, ``audit``, ``orgs``, ``jobs``). The targets live in ``functions/main.py``."""

from functions.main import audit, billing, jobs, orgs, stripe_webhook

__all__ = ["audit", "billing", "jobs", "orgs", "stripe_webhook"]
