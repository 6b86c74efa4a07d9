"""The transactions a handler works in. A handler says which it needs by the types of its parameters.

``Session``
    the request's one transaction acting as the caller (``authenticated``, the caller's claims:
    RLS, grants and ``auth.uid()`` behave as for a PostgREST client). The Router opens it around
    the handler and commits when the handler returns; an API key is looked up inside it.
``OpenSession``
    the same transaction, opened by the handler itself (``with open_session() as db:``) when it
    must do something outside any transaction afterwards (call Stripe). At most once.
``Backend``
    ``service_role`` transactions for backend bookkeeping (a verified Stripe event, a Stripe
    customer id), opened by the handler: ``with backend() as db:``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg

from .auth import Actor, Credential, actor_from_key
from .db import Database, call

Row = dict[str, Any]


class Tx:
    """One open transaction: RPCs and reads."""

    def __init__(self, cur: psycopg.Cursor[Row]) -> None:
        self.cur = cur

    def call(self, function: str, /, **args: Any) -> object:
        """``public.<function>(name => value, ...)``'s JSON answer (``function`` is a literal, never input)."""
        result: object = call(self.cur, function, **args)
        return result

    def call_dict(self, function: str, /, **args: Any) -> Row:
        """The answer of an RPC that answers a JSON object."""
        result = self.call(function, **args)
        if not isinstance(result, dict):
            raise TypeError(f"public.{function} answered {type(result).__name__}, not an object")
        return result

    def query(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """The rows of a read built from our own SQL text (values only ever as ``params``)."""
        return self.cur.execute(sql, params).fetchall()


class Session(Tx):
    """The request's one transaction, acting as the caller."""

    def __init__(self, cur: psycopg.Cursor[Row], actor: Actor, headers: dict[str, str]) -> None:
        super().__init__(cur)
        self.actor = actor
        self.headers = headers


@contextmanager
def caller_session(database: Database, credential: Credential, headers: dict[str, str]) -> Iterator[Session]:
    """Open the request's one transaction, acting as the caller ``credential`` names.

    A JWT was verified before (``Authenticator.credential``); an API key is looked up here, in
    the same transaction: no extra round trip per request.
    """
    if credential.kind == "jwt":
        with database.request("authenticated", credential.claims, headers) as cur:
            yield Session(cur, Actor(claims=credential.claims, user_id=str(credential.claims["sub"])), headers)
        return
    with database.request("service_role", None, headers) as cur:
        yield Session(cur, actor_from_key(cur, credential.key_hash, headers), headers)


class OpenSession:
    """Opens the request's one transaction as the caller when the handler asks, once."""

    def __init__(self, opener: AbstractContextManager[Session]) -> None:
        self._opener: AbstractContextManager[Session] | None = opener

    def __call__(self) -> AbstractContextManager[Session]:
        opener, self._opener = self._opener, None
        if opener is None:
            raise RuntimeError("a request has one transaction as its caller: OpenSession opened twice")
        return opener


class Backend:
    """``service_role`` transactions, for the backend's own bookkeeping."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @contextmanager
    def __call__(self) -> Iterator[Tx]:
        with self._database.request("service_role") as cur:
            yield Tx(cur)
