"""upshift platform: credit pools, audit logs and Stripe billing behind the upshift CLI."""

__version__ = "0.1.0"
