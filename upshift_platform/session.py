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

from .auth import Actor, Credential, actor_from_claims
from .db import Database, RequestTx, call_sql

Row = dict[str, Any]


class Tx:
    """One open transaction: RPCs and reads (sent lazily, see ``db.RequestTx``)."""

    def __init__(self, tx: RequestTx) -> None:
        self.tx = tx

    def call(self, function: str, /, *, last: bool = False, **args: Any) -> object:
        """``public.<function>(name => value, ...)``'s JSON answer (``function`` is a literal, never input).

        ``last=True``: nothing follows in this transaction, so the statement is sent with its COMMIT
        (one round trip for the whole request, and the rows it locks are held no longer than the
        server needs). The answer is then already committed when the handler sees it.
        """
        sql, params = call_sql(function, args)
        rows = self.tx.run(sql, params, last=last)
        return rows[0]["result"] if rows else None

    def call_dict(self, function: str, /, *, last: bool = False, **args: Any) -> Row:
        """The answer of an RPC that answers a JSON object."""
        result = self.call(function, last=last, **args)
        if not isinstance(result, dict):
            raise TypeError(f"public.{function} answered {type(result).__name__}, not an object")
        return result

    def query(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """The rows of a read built from our own SQL text (values only ever as ``params``)."""
        return self.tx.run(sql, params)


class Session(Tx):
    """The request's one transaction, acting as the caller."""

    def __init__(self, tx: RequestTx, credential: Credential, headers: dict[str, str]) -> None:
        super().__init__(tx)
        self._credential = credential
        self._actor: Actor | None = None
        self.headers = headers

    @property
    def actor(self) -> Actor:
        """Who the caller is; for an API key, known once the database has looked it up (with the first statement)."""
        if self._actor is None:
            if self._credential.kind == "jwt":
                claims = self._credential.claims
            else:
                claims = self.tx.ensure_claims() or {}
            self._actor = actor_from_claims(claims)
        return self._actor

    def known_actor_id(self) -> str | None:
        """The caller's id if it is known without asking the database (for the request's log line)."""
        if self._actor is None and (self._credential.kind == "jwt" or self.tx.claims is not None):
            return self.actor.id
        return None if self._actor is None else self._actor.id


@contextmanager
def caller_session(database: Database, credential: Credential, headers: dict[str, str]) -> Iterator[Session]:
    """Open the request's one transaction, acting as the caller ``credential`` names.

    A JWT was verified before (``Authenticator.credential``); an API key is looked up by the database
    in the same transaction, in the same message as the request's first statement
    (``public.api_key_claims``): no round trip of its own.
    """
    if credential.kind == "jwt":
        with database.transaction("authenticated", credential.claims, headers) as tx:
            yield Session(tx, credential, headers)
        return
    with database.transaction("service_role", None, headers, api_key_hash=credential.key_hash) as tx:
        yield Session(tx, credential, headers)


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
        with self._database.transaction("service_role") as tx:
            yield Tx(tx)
