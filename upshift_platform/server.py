"""Serve every function on one port with gunicorn (a production WSGI server)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from gunicorn.app.base import BaseApplication

from .app import create_wsgi_app


def configure_logging() -> None:
    """One JSON line per request on stderr (the ``upshift`` loggers)."""
    logger = logging.getLogger("upshift")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        configure_logging()
        return create_wsgi_app()


def serve(host: str, port: int, *, workers: int = 2, threads: int = 4) -> None:
    print(f"serving all functions on http://{host}:{port} ({workers} workers)", file=sys.stderr, flush=True)
    _Gunicorn({
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread",
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "timeout": 60,
        "graceful_timeout": 10,
    }).run()
