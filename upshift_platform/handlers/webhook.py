"""The stripe-webhook function: verify the raw body, then apply the event in one transaction."""

from __future__ import annotations

from .. import stripe_billing
from ..db import call
from ..http import Ctx, Router

router = Router("stripe_webhook")


@router.route("POST", "/stripe/webhook", auth=False,
              summary="Stripe events (signature-verified; each applied once; 500 makes Stripe retry)",
              errors=(400, 413, 503))
def stripe_webhook(ctx: Ctx):  # type: ignore[no-untyped-def]
    settings = ctx.platform.settings
    event = stripe_billing.verify_event(settings, ctx.raw_body(), ctx.request.headers.get("Stripe-Signature"))
    with ctx.platform.db.request("service_role") as cur:
        result = call(cur, "stripe_apply_event", event=event, config=settings.stripe.fulfilment_config())
    return {"received": True, **result}
