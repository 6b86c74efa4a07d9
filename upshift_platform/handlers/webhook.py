"""The stripe-webhook function: verify the raw body, then apply the event in one transaction."""

from __future__ import annotations

from typing import Any

from .. import stripe_billing
from ..routing import Ctx, Router
from ..session import Backend

router = Router("stripe_webhook")


@router.route("POST", "/stripe/webhook",
              summary="Stripe events (signature-verified; each applied once; 500 makes Stripe retry)",
              errors=(400, 413, 503))
def stripe_webhook(ctx: Ctx, raw: bytes, backend: Backend) -> dict[str, Any]:
    """No caller to authenticate: Stripe's signature over the raw body instead, then ``service_role``."""
    settings = ctx.platform.settings
    event = stripe_billing.verify_event(settings, raw, ctx.request.headers.get("Stripe-Signature"))
    with backend() as db:
        result = db.call_dict("stripe_apply_event", event=event, config=settings.stripe.fulfilment_config())
    return {"received": True, **result}
