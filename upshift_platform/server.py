"""Serve every function on one port with gunicorn (a production WSGI server), one worker process per core.

The workers are gunicorn's threaded workers (``gthread``) with three things their main thread does
itself, before a request reaches the thread pool (``Worker.enqueue_req``):

- ``GET /health`` and ``GET /health/live`` are answered there, from the database monitor's state
  (``db.Monitor``): never queued behind busy request threads, never waiting on the database;
- past ``threads + UPSHIFT_MAX_QUEUE`` requests in flight in a worker, a new request is answered
  503 ``overloaded`` with ``Retry-After`` at once instead of joining an ever longer queue;
- a connection whose client has already hung up is closed without starting its request (and the
  Router checks again just before a request's transaction begins: ``http.client_gone``).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import sys
import time
import uuid
from functools import partial
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from .app import create_wsgi_app, platform
from .db import RETRY_AFTER_S

DEFAULT_THREADS = 8
DEFAULT_MAX_QUEUE = 64
_HEALTH_PATHS = (b"/health", b"/health/live")


def default_workers() -> int:
    """One worker process per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_logging() -> None:
    """One JSON line per request on stderr (the ``upshift`` loggers)."""
    logger = logging.getLogger("upshift")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def health_answer(path: bytes) -> tuple[str, dict[str, Any]]:
    """The status line and body of ``/health`` or ``/health/live``, from the monitor's state (no query)."""
    if path == b"/health/live":
        return "200 OK", {"status": "ok"}
    state = platform().db.health(wait=0.05)
    if state == "up":
        return "200 OK", {"status": "ok", "database": "ok"}
    return "503 Service Unavailable", {
        "error": "database_unavailable", "message": "The database is unreachable.", "status": "degraded",
        "database": "down" if state == "down" else "unknown", "retry_after": RETRY_AFTER_S}


class Worker(ThreadWorker):
    """gunicorn's gthread worker whose main thread answers health, sheds load and drops gone clients."""

    inflight = 0
    max_inflight = DEFAULT_THREADS + DEFAULT_MAX_QUEUE

    def init_process(self) -> None:
        queue = int(os.environ.get("UPSHIFT_MAX_QUEUE") or DEFAULT_MAX_QUEUE)
        self.max_inflight = self.cfg.threads + max(0, queue)
        self.inflight = 0
        # The main thread (accepting, health, shedding) waits for the GIL behind busy request threads:
        # a shorter switch interval than Python's 5 ms keeps /health's answer in single milliseconds.
        sys.setswitchinterval(0.001)
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        platform().db.open()  # the pool and the database monitor start with the worker, not its first request

    def enqueue_req(self, conn: Any) -> None:
        if self._triage(conn):
            self.inflight += 1
            super().enqueue_req(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        self.inflight -= 1
        super().finish_request(conn, fs)

    def _triage(self, conn: Any) -> bool:
        """True: hand the connection to the thread pool. False: it was dealt with here."""
        parser = getattr(conn, "parser", None)
        if parser is not None and parser.unreader.buf.getvalue():
            return True  # a request already read ahead: the thread parses it
        try:
            head = conn.sock.recv(1024, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            # Nothing sent yet (a new connection): wait for its first bytes in the poller, not in a thread.
            conn.sock.setblocking(False)
            conn.timeout = time.monotonic() + self.cfg.keepalive
            self.pending_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))
            return False
        except OSError:
            self._drop(conn)
            return False
        if not head:  # the client hung up: nothing to answer
            self._drop(conn)
            return False
        line = head.split(b"\r\n", 1)[0]
        method, _, rest = line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method in (b"GET", b"HEAD") and path in _HEALTH_PATHS and b"\r\n\r\n" in head:
            status, body = health_answer(path)
            self._answer(conn, status, body, head_only=method == b"HEAD")
            return False
        if self.inflight >= self.max_inflight:
            self._answer(conn, "503 Service Unavailable", {
                "error": "overloaded", "retry_after": RETRY_AFTER_S,
                "message": "The server is at capacity; try again shortly."})
            return False
        return True

    def _answer(self, conn: Any, status: str, body: dict[str, Any], *, head_only: bool = False) -> None:
        """A complete answer from the main thread, then close (probes and shed clients reconnect)."""
        payload = json.dumps(body).encode()
        extra = f"Retry-After: {RETRY_AFTER_S}\r\n" if status.startswith("503") else ""
        head = (f"HTTP/1.1 {status}\r\nServer: gunicorn\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nX-Request-Id: {uuid.uuid4().hex}\r\n{extra}"
                "Connection: close\r\n\r\n").encode()
        try:
            conn.sock.recv(65536, socket.MSG_DONTWAIT)  # what the client sent: closing on unread data resets
        except OSError:
            pass
        try:
            conn.sock.settimeout(1.0)
            conn.sock.sendall(head if head_only else head + payload)
        except OSError:
            pass
        self._drop(conn)

    def _drop(self, conn: Any) -> None:
        self.nr_conns -= 1
        conn.close()


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


def serve(host: str, port: int, *, workers: int | None = None, threads: int = DEFAULT_THREADS) -> None:
    workers = workers or default_workers()
    print(f"serving all functions on http://{host}:{port} ({workers} workers x {threads} threads)",
          file=sys.stderr, flush=True)
    _Gunicorn({
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "upshift_platform.server.Worker",
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "timeout": 60,
        "graceful_timeout": 10,
    }).run()
